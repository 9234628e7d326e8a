"""``python -m course_utils.bench``: the course's performance table.

Every row compares a course pipeline with the naive pipeline for the same work,
measured in the same run on the same machine, and reports the ratio; absolute
times depend on the machine and are printed for information only.
Later parts of the course add their rows to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
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
from course_utils.explain.qscore import qscore
from course_utils.explain.relax import relax, relax_masks
from course_utils.models import SimCLRModel, atomic_write, load_pretrained, resnet
from course_utils.runtime import autocast, environment_report, format_report, get_device, quick_mode
from course_utils.simclr import nt_xent, train_simclr

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results.json"


@dataclass
class BenchRow:
    """One measurement: course pipeline vs naive pipeline, in items per second."""

    name: str
    workload: str
    unit: str
    course: float
    naive: float
    target: str

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
    masked = (image * relax_masks(num_masks, 32, generator=generator, device=device)[:, None]).split(batch_size)
    masks = relax_masks(loop_masks, 32, generator=generator, device=device)

    def plain_forwards() -> None:
        with torch.no_grad(), autocast(device):
            for batch in masked:
                encoder(batch)
        _synchronise(device)

    def one_forward_per_mask() -> None:
        with torch.no_grad(), autocast(device):
            h = encoder(image[None]).float()
            for mask in masks:
                F.cosine_similarity(h, encoder((image * mask)[None]).float()).item()

    plain = _best_of(2, plain_forwards)
    loop = _best_of(1, one_forward_per_mask)
    workload = f"ResNet-10 w32, 32 px, {num_masks} masks, batches of {batch_size}, {device.type}"
    return [
        BenchRow("RELAX (vs plain batched forwards)", workload, "masks/s", num_masks / course, num_masks / plain,
                 ">= 0.8x"),
        BenchRow("RELAX (vs one forward per mask)", workload + f"; loop over {loop_masks} masks", "masks/s",
                 num_masks / course, loop_masks / loop, ">= 3x CPU, >= 20x GPU"),
    ]


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


def bench_occlusion(quick: bool) -> BenchRow:
    """Conditional occlusion of a pair: all occluded copies as batches vs one forward per patch."""
    from course_utils.explain.pairs import conditional_occlusion, patch_masks, projection

    device = get_device()
    model = load_pretrained("simclr-shapes-r10").to(device).eval()
    embed = projection(model)
    x1, x2 = (ShapesWorld(n=2, seed=0, split="test").images.float() / 255).to(device)
    stride = 4 if quick else 2
    masks = patch_masks(32, stride=stride).to(device)
    def batched_pair() -> None:
        conditional_occlusion(embed, x1, x2, stride=stride)
        _synchronise(device)

    def one_by_one() -> None:
        with torch.no_grad():
            z2 = embed(x2[None])
            for mask in masks:
                F.cosine_similarity(embed(torch.where(mask, torch.zeros_like(x1), x1)[None]), z2)
        _synchronise(device)

    batched = _best_of(2, batched_pair)

    loop = _best_of(1, one_by_one) * 2  # both images of the pair
    patches = 2 * len(masks)
    return BenchRow("Conditional occlusion of a pair", f"{len(masks)} patches per image (9 px, stride {stride}), "
                    f"both images, {device.type}", "patches/s", patches / batched, patches / loop, "batched > loop")


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
}


def format_table(rows: list[BenchRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| benchmark | workload | course | naive | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.workload} | {r.course:,.0f} {r.unit} | {r.naive:,.0f} {r.unit} | "
            f"{r.ratio:.1f}x | {r.target} |"
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
