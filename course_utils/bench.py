"""``python -m course_utils.bench``: the course's performance table.

Every row compares a course pipeline with the naive pipeline for the same work,
measured in the same run on the same machine, and reports the ratio; absolute
times depend on the machine and are printed for information only.
Later parts of the course add their rows to ``BENCHMARKS``.  Rows that state a peak memory (the ``224`` rows)
measure it as the increase over what the process held before the run: on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, on a Linux CPU the resident set's high-water
mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``, after ``malloc_trim`` hands freed memory back);
elsewhere "—".
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from course_utils.data import shapes
from course_utils.data.augment import SimCLRAugment
from course_utils.data.shapes import ShapesWorld
from course_utils.explain.gradcam import gradcam, squared_norm
from course_utils.explain.qscore import qscore
from course_utils.explain.relax import relax, relax_masks
from course_utils.models import SimCLRModel, atomic_write, load_pretrained, resnet
from course_utils.runtime import (autocast, environment_report, fitting_batch_size, format_report, get_device,
                                  process_memory, quick_mode)
from course_utils.simclr import nt_xent, train_simclr

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results.json"


@dataclass
class BenchRow:
    """One measurement: course pipeline vs naive pipeline, in items per second, and where measured the peak
    memory of each run in bytes (None: not measured)."""

    name: str
    workload: str
    unit: str
    course: float
    naive: float
    target: str
    peak_memory: float | None = None
    naive_peak_memory: float | None = None

    @property
    def ratio(self) -> float:
        return self.course / self.naive


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Best wall-clock time of ``repeats`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the peak memory above what was held on
    entry, or None where it cannot be measured.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocation on entry.  CPU on
    Linux: glibc's ``malloc_trim`` first hands freed memory back (else a run reusing a previous run's freed
    memory shows no increase), then writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` to ``VmRSS``; the
    peak is ``VmHWM`` on exit minus ``VmRSS`` on entry."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes, self._base = device, None, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                _CLEAR_REFS.write_text("5")
                self._base = process_memory("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = float(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            peak = process_memory("VmHWM")
            self.bytes = float(max(0, peak - self._base)) if peak is not None else None


def _interleaved(device: torch.device, repeats: int, *fns: Callable[[], object]) -> list[tuple[float, float | None]]:
    """For each function: (best wall-clock time in seconds, peak memory in bytes or None) over ``repeats``
    rounds that call the functions in turn, so that load from other processes on a shared machine falls on
    all of them alike."""
    seconds = [float("inf")] * len(fns)
    peaks: list[float | None] = [None] * len(fns)
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            with PeakMemory(device) as peak:
                seconds[index] = min(seconds[index], _best_of(1, fn))
            if peak.bytes is not None:
                peaks[index] = max(peaks[index] or 0.0, peak.bytes)
    return list(zip(seconds, peaks))


def bench_shapes(quick: bool) -> BenchRow:
    """ShapesWorld generation: vectorised blocks vs rendering one image per call.

    The naive pipeline runs the same renderer on batches of one image, which
    is what a per-sample ``Dataset.__getitem__`` generator would do.
    """
    n = 5_000 if quick else 50_000
    seconds = _best_of(1 if quick else 2, lambda: ShapesWorld(n=n, size=32, seed=0))
    world = ShapesWorld(n=1, size=32, seed=0)
    params = world._draw_parameters(shapes._block_generator(0, "train", 0), 200)

    def one_at_a_time() -> None:
        for i in range(200):
            world._render({k: (v[i : i + 1] if v is not None else None) for k, v in params.items()})

    naive_seconds = _best_of(1, one_at_a_time)
    return BenchRow(
        name="ShapesWorld generation",
        workload=f"{n:,} images 32 px ({seconds:.1f} s; target < 20 s for 50,000)",
        unit="images/s",
        course=n / seconds,
        naive=200 / naive_seconds,
        target="50k in < 20 s",
    )


def _pil_pipeline(size: int):
    """The usual tutorial transform: per-sample PIL ops with the same strengths as SimCLRAugment()."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.5)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
    ])


def bench_augment(quick: bool) -> BenchRow:
    """Views per second: batched SimCLRAugment vs torchvision's per-sample PIL pipeline."""
    from torchvision.transforms.functional import to_pil_image

    n = 512 if quick else 4096
    world = ShapesWorld(n=n, seed=0)
    batch = world.images.float() / 255
    augment, generator = SimCLRAugment(32), torch.Generator().manual_seed(0)
    ours = _best_of(3, lambda: [augment(chunk, generator) for chunk in batch.split(256)])
    pil_images = [to_pil_image(img) for img in world.images[: n // 4]]
    pipeline = _pil_pipeline(32)
    naive = _best_of(1, lambda: [pipeline(img) for img in pil_images])
    return BenchRow("SimCLR augmentation", f"{n:,} views of 32 px images, batches of 256", "views/s",
                    n / ours, len(pil_images) / naive, ">= 10x")


class _TwoViews(torch.utils.data.Dataset):
    """Tutorial-style data set: a PIL image per item, two random views."""

    def __init__(self, world: ShapesWorld) -> None:
        from torchvision.transforms.functional import to_pil_image

        self.images = [to_pil_image(img) for img in world.images]
        self.transform = _pil_pipeline(world.size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return self.transform(image), self.transform(image)


def _model(depth: int = 10, width: int = 32) -> SimCLRModel:
    torch.manual_seed(0)
    return SimCLRModel(resnet(depth, width))


def _tutorial_pairs_per_s(world: ShapesWorld, batch_size: int, steps: int, device: torch.device,
                          depth: int = 10, width: int = 32, num_workers: int = 2) -> float:
    """DataLoader + per-sample torchvision transforms + fp32, contiguous tensors, on ``device``."""
    model = _model(depth, width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_TwoViews(world), batch_size=batch_size, shuffle=True,
                                         num_workers=num_workers, drop_last=True, persistent_workers=False,
                                         pin_memory=device.type == "cuda")
    iterator = iter(loader)
    next(iterator)  # start the workers before timing
    start = time.perf_counter()
    for _ in range(steps):
        v1, v2 = next(iterator)
        _, z = model(torch.cat([v1, v2]).to(device, non_blocking=True))
        loss = nt_xent(*z.chunk(2), temperature=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _synchronise(device)
    return steps * batch_size / (time.perf_counter() - start)


def _course_pairs_per_s(world: ShapesWorld, batch_size: int, precision: str, channels_last: bool,
                        device: torch.device, depth: int = 10, width: int = 32) -> float:
    previous = os.environ.get("COURSE_PRECISION")
    os.environ["COURSE_PRECISION"] = precision
    try:
        history = train_simclr(_model(depth, width), world, epochs=1, batch_size=batch_size, temperature=0.2,
                               progress=False, channels_last=channels_last, device=device)
    finally:
        if previous is None:
            os.environ.pop("COURSE_PRECISION")
        else:
            os.environ["COURSE_PRECISION"] = previous
    return history.pairs_per_s[-1]


def bench_training(quick: bool) -> list[BenchRow]:
    """End-to-end SimCLR pairs/s on ResNet-10 width 32, 32 px, CPU."""
    batch_size, steps = (64, 3) if quick else (256, 8)
    world = ShapesWorld(n=batch_size * (steps + 1), seed=0)
    cpu = torch.device("cpu")
    tutorial = _tutorial_pairs_per_s(world, batch_size, steps, cpu)
    course = _course_pairs_per_s(world, batch_size, "auto", True, cpu)
    fp32 = _course_pairs_per_s(world, batch_size, "fp32", False, cpu)
    workload = f"ResNet-10 w32, batch {batch_size}, 32 px, {steps} steps"
    return _training_rows("SimCLR training", workload, course, tutorial, fp32, "~3.5x on avx512_bf16/AMX")


def _training_rows(name: str, workload: str, course: float, tutorial: float, fp32: float,
                   precision_target: str) -> list[BenchRow]:
    return [
        BenchRow(f"{name} (course vs tutorial)", workload, "pairs/s", course, tutorial, ">= 3x"),
        BenchRow(f"{name} (bf16+channels_last vs fp32)", workload, "pairs/s", course, fp32, precision_target),
    ]


def bench_training_gpu(quick: bool) -> list[BenchRow]:
    """End-to-end SimCLR pairs/s of the GPU preset's encoder (ResNet-18 width 64, 32 px) on CUDA: the course
    pipeline (augmentation on the GPU, bf16, channels_last) vs the tutorial one (DataLoader with 8 workers,
    per-sample PIL transforms, fp32).  Returns no rows without a CUDA device."""
    device = get_device()
    if device.type != "cuda":
        print("training-gpu: skipped, no CUDA device", flush=True)
        return []
    batch_size, steps = (256, 5) if quick else (512, 30)
    world = ShapesWorld(n=batch_size * (steps + 1), seed=0)
    _course_pairs_per_s(world, batch_size, "auto", True, device, 18, 64)  # warm-up: cuDNN autotuning
    course = _course_pairs_per_s(world, batch_size, "auto", True, device, 18, 64)
    fp32 = _course_pairs_per_s(world, batch_size, "fp32", False, device, 18, 64)
    tutorial = _tutorial_pairs_per_s(world, batch_size, steps, device, 18, 64, num_workers=8)
    workload = f"ResNet-18 w64, batch {batch_size}, 32 px, {steps} steps, {torch.cuda.get_device_name(device)}"
    return _training_rows("SimCLR training on GPU", workload, course, tutorial, fp32, "faster")


def bench_relax(quick: bool) -> list[BenchRow]:
    """RELAX masks/s on the committed encoder: vs plain batched forwards of the same masked images
    (the bookkeeping must be nearly free) and vs the reference code's one forward per mask.

    All three run under the same autocast on the same device, so only batching and bookkeeping differ.
    """
    device = get_device()
    encoder = load_pretrained("simclr-shapes-r10").encoder.to(device).eval()
    image = ShapesWorld(n=1, seed=0, split="test").images[0].float().div(255).to(device)
    num_masks, loop_masks, batch_size = (500, 50, 100) if quick else (3000, 300, 100)
    if device.type == "cuda" and not quick:  # a batch of 100 32-px images leaves a GPU mostly idle
        num_masks, batch_size = 20_000, 2_000
    generator = torch.Generator().manual_seed(0)

    def course_relax() -> None:
        relax(encoder, image, num_masks, batch_size, generator=generator, progress=False)
        _synchronise(device)

    course = _best_of(2, course_relax)
    masks = relax_masks(num_masks, 32, generator=generator, device=device)
    plain_forwards, one_forward_per_mask = _relax_naive(encoder, image, masks, batch_size, loop_masks, device)
    plain = _best_of(2, plain_forwards)
    loop = _best_of(1, one_forward_per_mask)
    workload = f"ResNet-10 w32, 32 px, {num_masks} masks, batches of {batch_size}, {device.type}"
    return [
        BenchRow("RELAX (vs plain batched forwards)", workload, "masks/s", num_masks / course, num_masks / plain,
                 ">= 0.8x"),
        BenchRow("RELAX (vs one forward per mask)", workload + f"; loop over {loop_masks} masks", "masks/s",
                 num_masks / course, loop_masks / loop, ">= 3x CPU, >= 20x GPU"),
    ]


def _relax_naive(encoder: torch.nn.Module, image: torch.Tensor, masks: torch.Tensor, batch_size: int,
                 loop_masks: int, device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """RELAX's two naive pipelines, under the same autocast as ``relax``: plain batched forwards of the masked
    images (made beforehand, so only the forward passes are timed) and the reference code's one forward per mask
    (over the first ``loop_masks`` masks)."""
    masked = (image * masks[:, None]).split(batch_size)

    def plain_forwards() -> None:
        with torch.no_grad(), autocast(device):
            for batch in masked:
                encoder(batch)
        _synchronise(device)

    def one_forward_per_mask() -> None:
        with torch.no_grad(), autocast(device):
            h = encoder(image[None]).float()
            for mask in masks[:loop_masks]:
                F.cosine_similarity(h, encoder((image * mask)[None]).float()).item()

    return plain_forwards, one_forward_per_mask


def bench_qscore(quick: bool) -> BenchRow:
    """Q-Score of N x 512 ReLU-like features: the vectorised ``qscore`` vs a per-sample loop (numpy)."""
    import numpy as np

    n, r, loop_n = (20_000, 512, 500) if quick else (100_000, 512, 2_000)
    generator = torch.Generator().manual_seed(0)
    H = torch.relu(torch.randn(n, r, generator=generator)) ** 2
    seconds = _best_of(2, lambda: qscore(H, eps=2.0))
    rows = H[:loop_n].numpy().astype(np.float64)
    population = qscore(H, eps=2.0)
    frequency = population.frequency.numpy()
    discriminative = set(np.flatnonzero(population.discriminative.numpy()))

    def per_sample() -> None:
        for row in rows:  # the sets L_i, then Q_i, one sample at a time
            x = row / np.linalg.norm(row)
            mu, sigma = x.mean(), x.std()
            chosen = [j for j in np.flatnonzero(x > mu + 2.0 * sigma) if j in discriminative and frequency[j] > 0]
            float(np.mean(x[chosen] - mu)) if chosen else 0.0

    naive = _best_of(1, per_sample)
    return BenchRow("Q-Score", f"N = {n:,} x r = {r} ({seconds:.2f} s; target < 1 s for 100,000)", "samples/s",
                    n / seconds, loop_n / naive, "100k x 512 in < 1 s")


def _occlusion_runs(embed: Callable[[torch.Tensor], torch.Tensor], x1: torch.Tensor, x2: torch.Tensor, stride: int,
                    device: torch.device) -> tuple[Callable[[], None], Callable[[], None], int]:
    """Conditional occlusion of the pair (x1, x2) with the default patch: the course's batched call, the loop with
    one forward per occluded copy (both images), and the number of occluded copies."""
    from course_utils.explain.pairs import conditional_occlusion, patch_masks

    patches = patch_masks(x1.shape[-1], stride=stride).to(device)

    def batched_pair() -> None:
        conditional_occlusion(embed, x1, x2, stride=stride)
        _synchronise(device)

    def one_by_one() -> None:
        with torch.no_grad():
            for image, other in ((x1, x2), (x2, x1)):
                z = embed(other[None])
                for patch in patches:
                    F.cosine_similarity(embed(torch.where(patch, torch.zeros_like(image), image)[None]), z)
        _synchronise(device)

    return batched_pair, one_by_one, 2 * len(patches)


def bench_occlusion(quick: bool) -> BenchRow:
    """Conditional occlusion of a pair: all occluded copies as batches vs one forward per patch."""
    from course_utils.explain.pairs import projection

    device = get_device()
    model = load_pretrained("simclr-shapes-r10").to(device).eval()
    x1, x2 = (ShapesWorld(n=2, seed=0, split="test").images.float() / 255).to(device)
    stride = 4 if quick else 2
    batched_pair, one_by_one, patches = _occlusion_runs(projection(model), x1, x2, stride, device)
    batched = _best_of(2, batched_pair)
    loop = _best_of(1, one_by_one)
    return BenchRow("Conditional occlusion of a pair", f"{patches // 2} patches per image (9 px, stride {stride}), "
                    f"both images, {device.type}", "patches/s", patches / batched, patches / loop, "batched > loop")


def bench_224(quick: bool) -> list[BenchRow]:
    """The explainers at ImageNet size: a ResNet-50 (``resnet(50, 64, small_input=False)``, random weights,
    eval mode) on 224 px ShapesWorld images, each course pipeline against its loop, with the peak memory of
    both runs.  Under ``autocast`` (the course's precision), except the occlusions, which run in fp32 by design.

    * Grad-CAM of an SSL target (``squared_norm``, at layer4): one batched call vs one image at a time.
    * RELAX: ``relax`` with ``batch_size=None`` (fit memory, at most 100 per pass) vs plain batched forwards of
      the same masked images and vs the reference code's one forward per mask.
    * Conditional occlusion of a pair: batched (``batch_size=None``) vs one forward per patch.

    The pipelines of a row run in turn, twice (full mode), and each keeps its best time.
    """
    device = get_device()
    gpu = device.type == "cuda" and not quick
    torch.manual_seed(0)
    model = SimCLRModel(resnet(50, 64, small_input=False)).to(device).eval()
    encoder = model.encoder
    cam_images, num_masks, loop_masks, stride, repeats = (2, 8, 2, 160, 1) if quick else (8, 50, 10, 48, 2)
    if gpu:
        cam_images, num_masks, loop_masks, stride = 64, 2000, 200, 8
    world = ShapesWorld(n=max(2, cam_images), size=224, seed=0, split="test")
    images = (world.images.float() / 255).to(device)
    arch = f"ResNet-50 (random weights), 224 px, {device.type}"
    rows = []

    x = images[:cam_images]
    target, layer = squared_norm(), encoder.layer4

    def cam_batched() -> None:
        with autocast(device):
            gradcam(model, layer, x, target)
        _synchronise(device)

    def cam_one_by_one() -> None:
        with autocast(device):
            for i in range(len(x)):
                gradcam(model, layer, x[i:i + 1], target)
        _synchronise(device)

    with autocast(device):  # warm-up: first-call allocations, oneDNN/cuDNN primitives
        gradcam(model, layer, x[:1], target)
    (batched, batched_peak), (loop, loop_peak) = _interleaved(device, repeats, cam_batched, cam_one_by_one)
    rows.append(BenchRow("Grad-CAM at 224 px (batched vs one image at a time)",
                         f"{arch}; SSL target ||h||², layer4, {cam_images} images", "images/s",
                         cam_images / batched, cam_images / loop, "batched > loop", batched_peak, loop_peak))

    image = images[0]
    batch_size = fitting_batch_size(encoder, image.shape, None, cap=100, under_autocast=True)
    generator = torch.Generator().manual_seed(0)

    def course_relax() -> None:
        relax(encoder, image, num_masks, None, generator=generator, progress=False)
        _synchronise(device)

    masks = relax_masks(num_masks, 224, generator=torch.Generator().manual_seed(1), device=device)
    plain_forwards, one_forward_per_mask = _relax_naive(encoder, image, masks, batch_size, loop_masks, device)
    (course, course_peak), (plain, plain_peak), (loop, loop_peak) = _interleaved(
        device, repeats, course_relax, plain_forwards, one_forward_per_mask)
    workload = f"{arch}; {num_masks} masks, batch_size=None (fits {batch_size}: {min(num_masks, batch_size)} per pass)"
    rows += [
        BenchRow("RELAX at 224 px (vs plain batched forwards)", workload, "masks/s", num_masks / course,
                 num_masks / plain, ">= 0.8x on a GPU", course_peak, plain_peak),
        BenchRow("RELAX at 224 px (vs one forward per mask)", workload + f"; loop over {loop_masks} masks", "masks/s",
                 num_masks / course, loop_masks / loop, "batched > loop", course_peak, loop_peak),
    ]

    from course_utils.explain.pairs import projection

    embed = projection(model)
    x1, x2 = images[0], images[1]
    batched_pair, one_by_one, count = _occlusion_runs(embed, x1, x2, stride, device)
    (batched, batched_peak), (loop, loop_peak) = _interleaved(device, repeats, batched_pair, one_by_one)
    occlusion_batch = fitting_batch_size(embed, x1.shape, None, cap=min(256, count // 2), device=device)
    rows.append(BenchRow("Conditional occlusion at 224 px (batched vs one forward per patch)",
                         f"{arch}, fp32; {count // 2} patches per image (64 px, stride {stride}), both images, "
                         f"batch_size=None -> {occlusion_batch} per pass", "patches/s",
                         count / batched, count / loop, "batched > loop", batched_peak, loop_peak))
    return rows


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BENCHMARKS: dict[str, Callable[[bool], BenchRow | list[BenchRow]]] = {
    "shapes": bench_shapes,
    "augment": bench_augment,
    "training": bench_training,
    "training-gpu": bench_training_gpu,
    "relax": bench_relax,
    "qscore": bench_qscore,
    "occlusion": bench_occlusion,
    "224": bench_224,
}


def format_bytes(value: float | None) -> str:
    """Bytes as "1.2 GB" / "340 MB" / "12 kB" (decimal units); "—" for None (not measured)."""
    if value is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.{1 if unit == 'GB' else 0}f} {unit}"
    return f"{value:.0f} B"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.{1 if value < 10 else 0}f} {unit}"


def format_table(rows: list[BenchRow]) -> str:
    """A Markdown table of the rows; the peak memory column reads "course / naive" ("—" where not measured)."""
    lines = [
        "| benchmark | workload | course | naive | ratio | target | peak memory (course / naive) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        memory = "—" if r.peak_memory is None and r.naive_peak_memory is None else \
            f"{format_bytes(r.peak_memory)} / {format_bytes(r.naive_peak_memory)}"
        lines.append(
            f"| {r.name} | {r.workload} | {_rate(r.course, r.unit)} | {_rate(r.naive, r.unit)} | "
            f"{r.ratio:.1f}x | {r.target} | {memory} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[BenchRow]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (also COURSE_QUICK=1)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the rows (default {RESULTS})")
    args = parser.parse_args(argv)
    quick = args.quick or quick_mode()
    print(format_report(environment_report()))
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}\n")
    rows: list[BenchRow] = []
    for name in args.only or BENCHMARKS:
        result = BENCHMARKS[name](quick)
        rows.extend(result if isinstance(result, list) else [result])
    print(format_table(rows))
    report = {"environment": environment_report(), "quick": quick,
              "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=2).encode()))
    print(f"\nwritten to {args.json}")
    return rows


if __name__ == "__main__":
    main()
