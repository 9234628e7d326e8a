"""Device, precision, seeding and run-mode helpers shared by every notebook.

* ``get_device()`` picks cuda > mps > cpu; ``COURSE_DEVICE`` (cpu, cuda, cuda:<i>, mps) overrides it.
* ``autocast(device)`` is bf16 autocast where the hardware runs bf16 fast
  (CUDA with bf16 support, CPUs with avx512_bf16 or AMX) and a no-op elsewhere;
  ``COURSE_PRECISION=fp32`` turns it off (``precision_mode()``: "auto" or "fp32").
* ``quick_mode()`` is true under ``COURSE_QUICK=1`` (CI and ``make test``).
* Environment values outside the documented ones raise ValueError naming the allowed values.
* Importing this module caps PyTorch's CPU threads at the container's CPU quota (``cpu_quota()``):
  a Binder pod or CI container on a 64-core host with a 2-CPU quota would otherwise run 64
  threads on 2 CPUs, which makes small operations 10-50x slower.  ``OMP_NUM_THREADS`` wins.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
PRECISIONS = ("auto", "fp32")
DEVICE_TYPES = ("cpu", "cuda", "mps")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_quota(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """CPUs this process may use under its cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``),
    rounded up; ``None`` when no quota is set or the files are absent (bare metal, VMs, macOS)."""
    root = Path(cgroup_root)
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            quota_us, period_us = int(quota), int(period)
        elif (root / "cpu" / "cpu.cfs_quota_us").exists():
            quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        else:
            return None
    except (OSError, ValueError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, -(-quota_us // period_us))


def _cap_threads_at_quota() -> None:
    quota = cpu_quota()
    if quota is not None and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > quota:
        torch.set_num_threads(quota)


_cap_threads_at_quota()


def quick_mode() -> bool:
    """True when the environment asks for the quick (CI) settings: ``COURSE_QUICK=1``.

    ``COURSE_QUICK`` may be unset or empty (off), 1/true/yes/on or 0/false/no/off (any case).

    Raises:
        ValueError: any other value, naming the allowed ones.
    """
    value = os.environ.get("COURSE_QUICK", "").strip().lower()
    if value and value not in _TRUE + _FALSE:
        raise ValueError(f"COURSE_QUICK={os.environ['COURSE_QUICK']!r} is not understood; use one of "
                         f"{', '.join(_TRUE + _FALSE)} (or leave it unset).")
    return value in _TRUE


def precision_mode() -> str:
    """``COURSE_PRECISION``: "auto" (unset or empty: bf16 autocast where fast) or "fp32" (autocast off).

    Raises:
        ValueError: any other value, naming the allowed ones.
    """
    value = os.environ.get("COURSE_PRECISION", "").strip().lower() or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"COURSE_PRECISION={os.environ['COURSE_PRECISION']!r} is not understood; use one of "
                         f"{', '.join(PRECISIONS)} (or leave it unset).")
    return value


def get_device() -> torch.device:
    """The device to compute on: ``COURSE_DEVICE`` if set, else cuda > mps > cpu.

    Raises:
        ValueError: ``COURSE_DEVICE`` is not a compute device (cpu, cuda, cuda:<i>, mps; ``meta`` and
            the like hold no data) or names a device that this machine does not have.
    """
    requested = os.environ.get("COURSE_DEVICE", "").strip()
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as err:
            raise ValueError(f"COURSE_DEVICE={requested!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from err
        if device.type not in DEVICE_TYPES:
            raise ValueError(f"COURSE_DEVICE={requested!r} is not a device the course computes on; "
                             f"use one of {', '.join(DEVICE_TYPES)} (cuda:1 … picks a GPU), or leave it unset.")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"COURSE_DEVICE={requested!r} but PyTorch sees no CUDA GPU here; unset it or use cpu.")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"COURSE_DEVICE={requested!r} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             "use cuda:0 … or unset it.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"COURSE_DEVICE={requested!r} but MPS is not available here; unset it or use cpu.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); returns a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """True on CPUs with AMX tiles for bf16 matrix multiplication."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags(cpuinfo)


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 or AMX), so bf16 autocast is fast."""
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_enabled(device: torch.device | str) -> bool:
    """Whether ``autocast(device)`` will use bf16 on this machine."""
    if precision_mode() == "fp32":
        return False
    device = torch.device(device)
    if device.type == "cuda":
        # Native bf16 only (compute capability >= 8); emulated bf16 on older GPUs is slower than fp32.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_supports_bf16()
    return False


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on hardware that runs it fast, a no-op context elsewhere.

    Use it around forward passes only; losses that need precision (NT-Xent's
    log-sum-exp) should be computed in fp32 on ``.float()`` outputs.
    """
    device = torch.device(device)
    if bf16_enabled(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run a block with ``model`` in eval mode (BatchNorm uses its running statistics and leaves them
    unchanged; dropout is off), then restore the mode the model had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def environment_report() -> dict[str, str]:
    """Versions, device and precision, as printed at the top of every notebook."""
    import torchvision

    from course_utils import __version__

    device = get_device()
    quota = cpu_quota()
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "course_utils": __version__,
        "device": str(device),
        "bf16 autocast": "on" if bf16_enabled(device) else "off",
        "CPU threads": f"{torch.get_num_threads()}" + (f" (cgroup quota: {quota} CPUs)" if quota else ""),
        "CPU bf16 / AMX": f"{cpu_supports_bf16()} / {cpu_has_amx()}",
        "quick mode": str(quick_mode()),
    }
    if device.type == "cuda":
        report["GPU"] = torch.cuda.get_device_name(device)
    return report


def format_report(report: dict[str, str]) -> str:
    """A two-column text table of a report dict."""
    width = max(map(len, report))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in report.items())
