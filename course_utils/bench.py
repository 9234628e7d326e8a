"""``python -m course_utils.bench``: the course's performance table.

Every row compares a course pipeline with the naive pipeline for the same work,
measured in the same run on the same machine, and reports the ratio; absolute
times depend on the machine and are printed for information only.
Later parts of the course add their rows to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from course_utils.data import shapes
from course_utils.data.shapes import ShapesWorld
from course_utils.runtime import environment_report, format_report, quick_mode


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


BENCHMARKS: dict[str, Callable[[bool], BenchRow]] = {"shapes": bench_shapes}


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
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    quick = args.quick or quick_mode()
    print(format_report(environment_report()))
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}\n")
    rows = [BENCHMARKS[name](quick) for name in (args.only or BENCHMARKS)]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=2)
    return rows


if __name__ == "__main__":
    main()
