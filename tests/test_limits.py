"""Limits and environment: memory bounds of ShapesWorld, environment values, cache and figure paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from course_utils import plots, runtime, vlm
from course_utils.data import shapes
from course_utils.data.shapes import ShapesWorld

REPO = Path(__file__).resolve().parents[1]

# ShapesWorld requests run in a child process whose address space is capped at 1.5 GiB above what
# it holds after the imports: a request that allocated gigabytes fails there (MemoryError) instead
# of exhausting the machine, and one that takes too long is stopped by an alarm.
_LIMITED_RUN = r"""
import json, resource, signal, sys, time
from course_utils.data.shapes import ShapesWorld

cases = json.loads(sys.argv[1])
vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = vm_kb * 1024 + int(1.5 * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def alarm(*_):
    raise TimeoutError

signal.signal(signal.SIGALRM, alarm)
results = {}
for name, kwargs in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    signal.alarm(60)
    try:
        world = ShapesWorld(**kwargs)
        outcome = "built " + str(tuple(world.images.shape))
        del world
    except ValueError as err:
        outcome = "ValueError: " + str(err)
    except (MemoryError, RuntimeError) as err:
        outcome = "out of memory: " + type(err).__name__
    except TimeoutError:
        outcome = "still running after 60 s"
    finally:
        signal.alarm(0)
    results[name] = dict(outcome=outcome, seconds=time.perf_counter() - start,
                         peak_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
print(json.dumps(results))
"""

_REFUSED = {
    "a billion images": dict(n=10**9),
    "one image of 100,000 px": dict(n=1, size=100_000),
    "a million images of 512 px": dict(n=10**6, size=512),
}
_BUILT = {"one image of 512 px": dict(n=1, size=512)}


@pytest.fixture(scope="module")
def limited_runs() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _LIMITED_RUN, json.dumps({**_REFUSED, **_BUILT})], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- ShapesWorld memory bound

@pytest.mark.parametrize("case", list(_REFUSED))
def test_shapesworld_refuses_requests_over_the_memory_bound_before_allocating(limited_runs, case):
    run = limited_runs[case]
    assert run["outcome"].startswith("ValueError") and "MAX_MEMORY_BYTES" in run["outcome"], run
    assert run["seconds"] < 2.0 and run["peak_growth_mb"] < 100, run


def test_one_large_image_renders_only_that_image_within_the_bound(limited_runs):
    run = limited_runs["one image of 512 px"]
    assert run["outcome"] == "built (1, 3, 512, 512)", run
    assert run["peak_growth_mb"] < 1024, run


def test_memory_bound_is_a_documented_module_constant_and_the_estimate_counts_the_pixels():
    assert shapes.MAX_MEMORY_BYTES == 4 * 2**30 and "MAX_MEMORY_BYTES" in ShapesWorld.__doc__
    assert ShapesWorld.memory_estimate(10**9, 32) > 10**9 * 3 * 32 * 32 > shapes.MAX_MEMORY_BYTES
    fits = ShapesWorld.max_images(64)
    assert ShapesWorld.memory_estimate(fits, 64) <= shapes.MAX_MEMORY_BYTES < ShapesWorld.memory_estimate(fits + 1, 64)
    with pytest.raises(ValueError, match=f"at most n={fits:,}"):
        ShapesWorld(n=fits + 1, size=64)


@pytest.mark.parametrize("difficulty, size, n, chunk_points", [
    ("easy", 32, 3, None), ("default", 32, 5, None), ("hard", 32, 7, None), ("hard", 48, 2, None),
    ("hard", 32, 7, 3 * 64 * 64),  # 3 images per render chunk: noise drawn over several chunks and skips
])
def test_rendering_only_the_needed_rows_gives_the_images_of_the_whole_block(monkeypatch, difficulty, size, n,
                                                                            chunk_points):
    """The reference draws every parameter and all pixel noise of block 0 at once, then renders n rows."""
    if chunk_points is not None:
        monkeypatch.setattr(shapes, "_RENDER_POINTS", chunk_points)
    world = ShapesWorld(n=n, size=size, seed=4, difficulty=difficulty, distractor_p=0.5)
    params = world._draw_parameters(shapes._block_generator(4, "train", 0), shapes._BLOCK)
    images, masks, bars = world._render({k: (v[:n] if v is not None else None) for k, v in params.items()})
    assert torch.equal(world.images, images) and torch.equal(world.masks, masks)
    assert torch.equal(world.distractor_masks, bars)
    assert torch.equal(world.labels, params["shape"][:n])


def test_numpy_integers_are_accepted_and_give_the_same_world_as_python_integers():
    world = ShapesWorld(n=np.int64(6), size=np.int32(32), seed=np.uint8(3), difficulty="hard")
    same = ShapesWorld(n=6, size=32, seed=3, difficulty="hard")
    assert torch.equal(world.images, same.images) and world.captions == same.captions
    assert type(world.n) is int and type(world.size) is int and type(world.seed) is int
    for bad in (dict(n=2.0), dict(n=True), dict(size=np.float32(32)), dict(seed=-1)):
        with pytest.raises(ValueError):
            ShapesWorld(**bad)


# ---------------------------------------------------------------- environment variables

@pytest.mark.parametrize("value", ["2", "maybe", "quick"])
def test_course_quick_with_an_undocumented_value_raises_listing_the_allowed_ones(monkeypatch, value):
    monkeypatch.setenv("COURSE_QUICK", value)
    with pytest.raises(ValueError, match=r"COURSE_QUICK.*1, true, yes, on, 0, false, no, off"):
        runtime.quick_mode()


def test_course_quick_documented_values_still_switch_it_on_and_off(monkeypatch):
    for value, expected in [("1", True), (" TRUE ", True), ("on", True), ("0", False), ("off", False),
                            ("", False)]:
        monkeypatch.setenv("COURSE_QUICK", value)
        assert runtime.quick_mode() is expected, value
    monkeypatch.delenv("COURSE_QUICK")
    assert runtime.quick_mode() is False


@pytest.mark.parametrize("value", ["fp16", "bf16", "float32"])
def test_course_precision_with_an_undocumented_value_raises_listing_the_allowed_ones(monkeypatch, value):
    monkeypatch.setenv("COURSE_PRECISION", value)
    with pytest.raises(ValueError, match=r"COURSE_PRECISION.*auto, fp32"):
        runtime.bf16_enabled("cpu")
    with pytest.raises(ValueError, match=r"auto, fp32"):
        runtime.precision_mode()


def test_course_precision_documented_values_are_read_in_one_place(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda cpuinfo=None: True)
    for value, mode, bf16 in [("fp32", "fp32", False), ("FP32", "fp32", False), ("auto", "auto", True),
                              ("", "auto", True)]:
        monkeypatch.setenv("COURSE_PRECISION", value)
        assert runtime.precision_mode() == mode and runtime.bf16_enabled("cpu") is bf16, value


@pytest.mark.parametrize("value", ["meta", "cpu_meta_please", "xla"])
def test_course_device_that_computes_nothing_is_rejected_at_once(monkeypatch, value):
    monkeypatch.setenv("COURSE_DEVICE", value)
    with pytest.raises(ValueError, match="cpu.*cuda.*mps"):
        runtime.get_device()


# ---------------------------------------------------------------- paths

class _StubModel:
    fingerprint = "stub-model-for-the-cache-test"

    def encode_texts(self, texts):
        return torch.nn.functional.normalize(torch.arange(1.0, 1.0 + 4 * len(texts)).view(len(texts), 4), dim=1)


def test_text_embedding_cache_lives_under_course_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_ROOT", str(tmp_path))
    assert vlm.default_cache_dir() == tmp_path / "text_embeddings"
    embeddings = vlm.caption_embeddings(_StubModel(), ["a red star", "a blue ring"])
    written = list((tmp_path / "text_embeddings").glob("*.pt"))
    assert len(written) == 1 and torch.equal(torch.load(written[0], weights_only=True), embeddings)


@pytest.mark.parametrize("name", ["../x", "ABSOLUTE", "a/b/c", "a/../../x", "a\\b", "", "./x", "a//b"])
def test_save_figure_refuses_names_that_leave_the_figures_folder(monkeypatch, tmp_path, name):
    figures = tmp_path / "figures"
    monkeypatch.setenv("COURSE_FIGURES_DIR", str(figures))
    if name == "ABSOLUTE":  # an absolute path (inside tmp_path, so nothing escapes even if it were written)
        name = str(tmp_path / "elsewhere" / "x")
    fig, _ = plt.subplots()
    try:
        with pytest.raises(ValueError, match="plain file name"):
            plots.save_figure(fig, name)
    finally:
        plt.close(fig)
    assert not list(tmp_path.rglob("*.png"))


def test_save_figure_refuses_a_folder_link_that_points_outside(monkeypatch, tmp_path):
    figures, outside = tmp_path / "figures", tmp_path / "outside"
    figures.mkdir()
    outside.mkdir()
    (figures / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("COURSE_FIGURES_DIR", str(figures))
    fig, _ = plt.subplots()
    try:
        with pytest.raises(ValueError, match="plain file name"):
            plots.save_figure(fig, "link/x")
    finally:
        plt.close(fig)
    assert not list(outside.iterdir())


def test_save_figure_writes_plain_names_and_one_notebook_folder_inside_the_figures_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_FIGURES_DIR", str(tmp_path))
    fig, _ = plt.subplots()
    try:
        assert plots.save_figure(fig, "loss_curve") == tmp_path / "loss_curve.png"
        assert plots.save_figure(fig, "01_simclr/loss_curve") == tmp_path / "01_simclr" / "loss_curve.png"
    finally:
        plt.close(fig)
    assert (tmp_path / "01_simclr" / "loss_curve.png").is_file()
