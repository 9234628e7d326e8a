"""Device, precision, seeding and run-mode helpers shared by every notebook.

* ``get_device()`` picks cuda > mps > cpu; ``COURSE_DEVICE`` (cpu, cuda, cuda:<i>, mps) overrides it.
* ``autocast(device)`` is bf16 autocast where the hardware runs bf16 fast
  (CUDA with bf16 support, CPUs with avx512_bf16 or AMX) and a no-op elsewhere;
  ``COURSE_PRECISION=fp32`` turns it off (``precision_mode()``: "auto" or "fp32").
* ``quick_mode()`` is true under ``COURSE_QUICK=1`` (CI and ``make test``).
* ``fitting_batch_size(model, image_shape)`` is the largest batch of a no-grad forward pass that fits in the
  free memory of the device (capped at the caller's default); explainers use it for ``batch_size=None``.
* Environment values outside the documented ones raise ValueError naming the allowed values.
* Importing this module caps PyTorch's CPU threads at the container's CPU quota (``cpu_quota()``):
  a Binder pod or CI container on a 64-core host with a 2-CPU quota would otherwise run 64
  threads on 2 CPUs, which makes small operations 10-50x slower.  ``OMP_NUM_THREADS`` wins.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
PRECISIONS = ("auto", "fp32")
DEVICE_TYPES = ("cpu", "cuda", "mps")
_CPUINFO = Path("/proc/cpuinfo")
_MEMINFO = Path("/proc/meminfo")


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


# Peak memory of a no-grad forward pass, per image: ACTIVATION_FACTOR x the largest tensor that any module
# returns (a layer's input and output, a residual branch kept alive, convolution workspace; measured 4-5.5x
# for a ResNet-50 at 224 px on a CPU) plus INPUT_COPIES x the input image (the caller's masked or occluded
# copies, blend temporaries and the model's normalised copy).
ACTIVATION_FACTOR = 6
INPUT_COPIES = 4
MEMORY_SAFETY = 0.5  # share of the available memory a batch may use (other processes, allocator caches)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _cgroup_memory_left(cgroup_root: Path) -> int | None:
    """Bytes left under the cgroup's memory limit (v2 ``memory.max`` - ``memory.current``, v1
    ``memory.limit_in_bytes`` - ``memory.usage_in_bytes``); None without a limit or where unreadable."""
    for limit_name, usage_name in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit_text = (cgroup_root / limit_name).read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int((cgroup_root / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1 writes "no limit" as a page-rounded 2**63
            return None
        return max(0, limit - usage)
    return None


def _available_bytes(device: torch.device, meminfo: str | os.PathLike = _MEMINFO,
                     cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """Memory a new batch may take on ``device``, in bytes, before the safety fraction; None where unknown.

    CUDA: free device memory (``torch.cuda.mem_get_info``) plus what PyTorch's cache holds unused.
    CPU: ``MemAvailable`` of ``/proc/meminfo``, or less if the cgroup's memory limit leaves less.
    MPS: the recommended working set minus what is allocated."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
        except (AttributeError, RuntimeError):
            return None
    candidates = []
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value, unit = line.split(":", 1)[1].split()[:2]
                candidates.append(int(value) * (1024 if unit.lower() == "kb" else 1))
                break
    except (OSError, ValueError, IndexError):
        pass
    left = _cgroup_memory_left(Path(cgroup_root))
    if left is not None:
        candidates.append(left)
    return min(candidates) if candidates else None


def _forward_bytes_per_image(model: Callable[[torch.Tensor], Any], image_shape: tuple[int, ...],
                             device: torch.device, dtype: torch.dtype, under_autocast: bool) -> int:
    """Estimated peak bytes per image of a no-grad forward pass, from a forward pass of two blank images with
    a global forward hook that records the largest tensor any module returns.  Every module runs in eval mode
    (restored afterwards), so the probe leaves BatchNorm statistics as they were."""
    largest = 0

    def record(_module: torch.nn.Module | None, _inputs: Any, output: Any) -> None:
        nonlocal largest
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                largest = max(largest, tensor.numel() * tensor.element_size())

    switched: list[torch.nn.Module] = []

    def evaluate(module: torch.nn.Module, _inputs: Any) -> None:
        if module.training:  # the probe must not move BatchNorm's running statistics, whatever calls the module
            switched.append(module)
            module.training = False

    probe = torch.zeros(2, *image_shape, device=device, dtype=dtype)
    handles = (torch.nn.modules.module.register_module_forward_pre_hook(evaluate),
               torch.nn.modules.module.register_module_forward_hook(record))
    try:
        with torch.no_grad(), (autocast(device) if under_autocast else contextlib.nullcontext()):
            output = model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for module in switched:
            module.training = True
    record(None, (), output)  # a model without modules (a plain function) still has an output
    input_bytes = probe[0].numel() * probe.element_size()
    return ACTIVATION_FACTOR * max(largest // 2, input_bytes) + INPUT_COPIES * input_bytes


def fitting_batch_size(model: Callable[[torch.Tensor], Any], image_shape: Sequence[int], requested: int | None = None,
                       *, cap: int = 256, budget_bytes: float | None = None, safety: float = MEMORY_SAFETY,
                       device: torch.device | str | None = None, under_autocast: bool = False,
                       per_image_bytes: int | None = None, name: str = "batch_size") -> int:
    """The batch size for no-grad forward passes of ``model``: ``requested`` if given (checked), else the
    largest batch that fits in memory, at most ``cap``.

    What an explainer's ``batch_size=None`` means.  The memory per image is estimated from one forward pass
    of two blank images: ``ACTIVATION_FACTOR`` (6) x the largest tensor a module returns plus ``INPUT_COPIES``
    (4) x the image (e.g. 22 MB for a ResNet-50 at 224 px in fp32, 0.8 MB for the course's ResNet-10 w32 at
    32 px).  The budget is ``safety`` (0.5) x the available memory: on CUDA the free device memory plus
    PyTorch's unused cache, on a CPU ``MemAvailable`` (``/proc/meminfo``) or the cgroup limit's remainder if
    smaller; where neither can be read (macOS CPU) the batch is ``cap``.  The cap keeps today's defaults, so
    small images give the same batches, and so the same numbers, as before.

    Args:
        model: a module or any function of images [B, *image_shape] (e.g. ``pairs.projection(model)``); the
            modules it calls are seen through global forward hooks and run in eval mode for the probe (their
            mode is restored, BatchNorm statistics stay unchanged).
        image_shape: one image's shape [C, H, W].
        requested: an explicit batch size: returned as it is after checking it is a positive integer.
        cap: the largest batch returned (the caller's former fixed default).
        budget_bytes: the memory the batch may use, instead of ``safety`` x the available memory.
        safety: the share of the available memory in (0, 1].
        device: where the forward passes run (default: the device of the model's parameters, else the CPU).
        under_autocast: estimate the probe under ``autocast(device)``, as the caller runs it (bf16 halves it).
        per_image_bytes: a known per-image peak, which skips the probe forward pass.
        name: the argument's name in error messages.
    Returns:
        an int in [1, cap]: 1 when even one image exceeds the budget (the estimate is conservative).
    Raises:
        ValueError: ``requested``, ``cap`` or ``per_image_bytes`` is not a positive integer, ``budget_bytes`` is
            not a positive number, ``safety`` is outside (0, 1] or ``image_shape`` is not [C, H, W].
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
            raise ValueError(f"{name} must be a positive integer (images per forward pass) or None (the largest "
                             f"batch that fits in memory, at most {cap}), got {requested!r}")
        return int(requested)
    cap = _positive_int(cap, "cap")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float))
                                     or not math.isfinite(budget_bytes) or budget_bytes <= 0):
        raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not 0 < safety <= 1:
        raise ValueError(f"safety must be a fraction in (0, 1], got {safety!r}")
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
                                  for d in shape):
        raise ValueError(f"image_shape must be one image's [C, H, W] with positive sizes, got {shape}")
    if cap == 1:
        return 1  # nothing to measure
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    if budget_bytes is None:
        available = _available_bytes(device)
        if available is None:
            return cap
        budget_bytes = safety * available
    if per_image_bytes is None:
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        per_image_bytes = _forward_bytes_per_image(model, tuple(int(d) for d in shape), device, dtype, under_autocast)
    else:
        per_image_bytes = _positive_int(per_image_bytes, "per_image_bytes")
    return max(1, min(cap, int(budget_bytes // per_image_bytes)))


_STATUS = Path("/proc/self/status")


def process_memory(field: str = "VmHWM") -> int | None:
    """A ``/proc/self/status`` memory field of this process in bytes: ``VmHWM`` (peak resident memory) or
    ``VmRSS`` (resident now); None where there is none (not Linux)."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
