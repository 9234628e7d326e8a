import contextlib

import numpy as np
import pytest
import torch

from course_utils import runtime

CPUINFO_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
CPUINFO_AMX = "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"
CPUINFO_PLAIN = "flags\t\t: fpu sse avx2\n"


def test_bf16_detection_reads_cpu_flags():
    assert runtime.cpu_supports_bf16(CPUINFO_BF16)
    assert runtime.cpu_supports_bf16(CPUINFO_AMX)
    assert not runtime.cpu_supports_bf16(CPUINFO_PLAIN)
    assert not runtime.cpu_supports_bf16("")
    assert runtime.cpu_has_amx(CPUINFO_AMX) and not runtime.cpu_has_amx(CPUINFO_BF16)


def test_autocast_is_bf16_on_capable_cpu_and_noop_elsewhere(monkeypatch):
    monkeypatch.delenv("COURSE_PRECISION", raising=False)
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda cpuinfo=None: True)
    layer = torch.nn.Linear(4, 4)
    with runtime.autocast("cpu"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda cpuinfo=None: False)
    assert isinstance(runtime.autocast("cpu"), contextlib.nullcontext)
    with runtime.autocast("cpu"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_precision_env_turns_bf16_off(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda cpuinfo=None: True)
    monkeypatch.setenv("COURSE_PRECISION", "fp32")
    assert not runtime.bf16_enabled("cpu")


def test_quick_mode_follows_environment(monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "1")
    assert runtime.quick_mode()
    monkeypatch.setenv("COURSE_QUICK", "0")
    assert not runtime.quick_mode()
    monkeypatch.delenv("COURSE_QUICK")
    assert not runtime.quick_mode()


def test_device_env_override_and_clear_error(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "gpu-please")
    with pytest.raises(ValueError, match="not a device name"):
        runtime.get_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("COURSE_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            runtime.get_device()


def test_device_default_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.get_device().type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.get_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_device().type == "cuda"


def test_seed_everything_repeats_random_draws():
    g = runtime.seed_everything(3)
    a = (torch.rand(3), torch.rand(3, generator=g))
    g = runtime.seed_everything(3)
    b = (torch.rand(3), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_environment_report_names_device_and_versions():
    report = runtime.environment_report()
    for key in ("python", "torch", "device", "bf16 autocast", "quick mode"):
        assert report[key]
    text = runtime.format_report(report)
    assert "torch" in text and report["torch"] in text


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs round up
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
])
def test_cpu_quota_reads_cgroup_v2_and_v1_files(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runtime.cpu_quota(tmp_path) == expected


# --- fitting_batch_size: the largest batch of a no-grad forward pass that fits in memory ---------------------

def _conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 8, 3, padding=1)


def _per_image(channels_out: int = 8, size: int = 16) -> int:
    """The helper's documented estimate for ``_conv`` on [3, size, size] fp32 images."""
    return runtime.ACTIVATION_FACTOR * channels_out * size * size * 4 + runtime.INPUT_COPIES * 3 * size * size * 4


def test_fitting_batch_size_follows_a_fabricated_budget_up_to_the_cap():
    model, per_image = _conv(), _per_image()
    assert runtime.fitting_batch_size(model, (3, 16, 16), budget_bytes=10 * per_image, cap=256) == 10
    assert runtime.fitting_batch_size(model, (3, 16, 16), budget_bytes=10.5 * per_image, cap=256) == 10
    assert runtime.fitting_batch_size(model, (3, 16, 16), budget_bytes=1000 * per_image, cap=256) == 256
    assert runtime.fitting_batch_size(model, (3, 16, 16), budget_bytes=100, cap=256) == 1  # never below one image
    # four times the pixels, a quarter of the batch
    assert runtime.fitting_batch_size(model, (3, 32, 32), budget_bytes=40 * per_image, cap=256) == 10
    assert runtime.fitting_batch_size(model, (3, 16, 16), budget_bytes=7, per_image_bytes=2) == 3  # no probe


def test_fitting_batch_size_takes_a_share_of_the_available_memory(monkeypatch):
    per_image = _per_image()
    monkeypatch.setattr(runtime, "_available_bytes", lambda device: 40 * per_image)
    assert runtime.fitting_batch_size(_conv(), (3, 16, 16), cap=256) == 40 * runtime.MEMORY_SAFETY
    assert runtime.fitting_batch_size(_conv(), (3, 16, 16), cap=256, safety=0.25) == 10
    assert runtime.fitting_batch_size(_conv(), (3, 16, 16), cap=7) == 7
    monkeypatch.setattr(runtime, "_available_bytes", lambda device: None)  # unknown (macOS CPU): the cap
    assert runtime.fitting_batch_size(_conv(), (3, 16, 16), cap=100) == 100


def test_an_explicit_batch_size_is_returned_as_it_is():
    assert runtime.fitting_batch_size(_conv(), (3, 16, 16), 5000, budget_bytes=100) == 5000
    assert runtime.fitting_batch_size(_conv(), (3, 16, 16), np.int64(3)) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"requested": 0}, "batch_size must be a positive integer"),
    ({"requested": -4}, "batch_size must be a positive integer"),
    ({"requested": 2.5}, "batch_size must be a positive integer"),
    ({"requested": True}, "batch_size must be a positive integer"),
    ({"requested": "8"}, "batch_size must be a positive integer"),
    ({"budget_bytes": 0}, "budget_bytes"),
    ({"budget_bytes": -1e9}, "budget_bytes"),
    ({"budget_bytes": float("nan")}, "budget_bytes"),
    ({"safety": 0}, "safety"),
    ({"safety": 1.5}, "safety"),
    ({"cap": 0}, "cap"),
    ({"per_image_bytes": 0, "budget_bytes": 1e6}, "per_image_bytes"),
    ({"image_shape": (16, 16)}, r"\[C, H, W\]"),
    ({"image_shape": (3, 0, 16)}, r"\[C, H, W\]"),
])
def test_fitting_batch_size_rejects_bad_arguments_clearly(kwargs, message):
    arguments = {"image_shape": (3, 16, 16)} | kwargs
    with pytest.raises(ValueError, match=message):
        runtime.fitting_batch_size(_conv(), **arguments)


def test_the_probe_leaves_batch_norm_statistics_and_modes_unchanged_and_takes_functions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 14 * 14, 6), torch.nn.BatchNorm1d(6)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embed = lambda images: model(images) * 2  # noqa: E731 - a closure, as pairs.projection returns
    assert runtime.fitting_batch_size(embed, (3, 16, 16), budget_bytes=1e9, cap=50) == 50
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    plain = runtime.fitting_batch_size(lambda images: images.flatten(1), (3, 16, 16), budget_bytes=1e5, cap=256)
    assert plain == int(1e5 // ((runtime.ACTIVATION_FACTOR + runtime.INPUT_COPIES) * 3 * 16 * 16 * 4))


@pytest.mark.parametrize("files, meminfo_kb, expected", [
    ({}, 1000, 1000 * 1024),  # no cgroup limit: MemAvailable
    ({"memory.max": "max\n", "memory.current": "5\n"}, 1000, 1000 * 1024),
    ({"memory.max": "600000\n", "memory.current": "100000\n"}, 1000, 500000),  # v2 limit leaves less
    ({"memory/memory.limit_in_bytes": "300000\n", "memory/memory.usage_in_bytes": "100000\n"}, 1000, 200000),
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1\n"}, 1000,
     1000 * 1024),  # v1 without a limit
    ({"memory.max": "600000\n", "memory.current": "100000\n"}, None, 500000),  # no /proc/meminfo (cgroup only)
    ({}, None, None),  # nothing readable: unknown
])
def test_available_cpu_memory_reads_meminfo_and_the_cgroup_limit(tmp_path, files, meminfo_kb, expected):
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    meminfo = tmp_path / "meminfo"
    if meminfo_kb is not None:
        meminfo.write_text(f"MemTotal:       9999999 kB\nMemFree:       1 kB\nMemAvailable:   {meminfo_kb} kB\n")
    assert runtime._available_bytes(torch.device("cpu"), meminfo, root) == expected
