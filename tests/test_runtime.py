import contextlib

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
