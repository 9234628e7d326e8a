"""Encoders, the SimCLR model and safe checkpoints.

Every model takes float images in [0, 1] of shape [B, 3, H, W]; the input normalisation is a
layer inside the model (``Normalize``), so explainability methods can perturb raw pixels.
Checkpoints hold only tensors and plain python values (loaded with ``weights_only=True``), are
written atomically, and are verified against ``SHA256SUMS`` beside them when listed there (an
``UnverifiedCheckpointWarning`` says when a loaded file is not listed; see ``load_verified``).
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch
import torchvision
from torch import nn

import course_utils
from course_utils.inputs import check_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "ssl-xai-course/1"
CHECKSUM_FILE = "SHA256SUMS"
_TRAIN_HINT = "train one with `python -m course_utils.train`"
_PLAIN_SCALARS = (str, int, float, bool, type(None))


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for [B, 3, H, W] images; mean/std are [1, 3, 1, 1] buffers."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection: [B, C_in, H, W] -> [B, width, H/s, W/s]."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        nn.init.zeros_(self.bn2.weight)  # the block starts as the identity
        self.shortcut = _shortcut(in_ch, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck: [B, C_in, H, W] -> [B, 4 * width, H/s, W/s]."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn3.weight)  # the block starts as the identity
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


_ARCHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet encoder: images [B, 3, H, W] in [0, 1] -> features h [B, out_dim]."""

    def __init__(self, depth: int = 18, width: int = 64, small_input: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth not in _ARCHS:
            raise ValueError(f"unsupported ResNet depth {depth!r}; supported depths: {sorted(_ARCHS)}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        block, counts = _ARCHS[depth]
        self.config = {"depth": depth, "width": width, "small_input": bool(small_input)}
        self.normalize = Normalize(mean, std)
        if small_input:  # <= 64 px images: keep the resolution
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        in_ch, stages = width, []
        for i, n in enumerate(counts):
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, width * 2**i, 2 if i > 0 and j == 0 else 1))
                in_ch = width * 2**i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [0, 1] -> [B, out_dim] features.

        The images pass the course's input guard (``inputs.check_images``): uint8, 0–255 or normalised
        values, NaN/inf, a wrong shape or an empty batch raise ``ValueError``; float64 images are converted
        to the model's dtype and device."""
        x = check_images(x, "images", like=self)
        x = self.stem(self.normalize(x))
        return self.pool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def resnet(depth: int = 18, width: int = 64, small_input: bool = True,
           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ResNet:
    """ResNet-``depth`` (10, 18, 34 or 50) with stage widths width, 2w, 4w, 8w (x4 for ResNet-50).

    ``small_input=True`` uses a 3x3 stride-1 stem without max-pool (images <= 64 px); ``False`` the
    ImageNet 7x7 stride-2 stem with max-pool. Returns a module mapping [B, 3, H, W] -> [B, out_dim].
    """
    return ResNet(depth, width, small_input, mean, std)


class SimCLRModel(nn.Module):
    """Encoder plus non-linear SimCLR projection head: x [B, 3, H, W] -> (h [B, r], z [B, proj_dim])."""

    def __init__(self, encoder: ResNet, proj_dim: int = 128) -> None:
        super().__init__()
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim < 1:
            raise ValueError(f"proj_dim must be an integer >= 1, got {proj_dim!r}")
        r = encoder.out_dim
        self.encoder = encoder
        self.projector = nn.Sequential(  # no bias before BatchNorm, which would cancel it
            nn.Linear(r, r, bias=False), nn.BatchNorm1d(r), nn.ReLU(), nn.Linear(r, proj_dim))
        self.config = {"encoder": dict(encoder.config), "proj_dim": proj_dim}
        self.metadata: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [0, 1] -> (representation h [B, r], projection z [B, proj_dim])."""
        h = self.encoder(x)
        return h, self.projector(h)


def build_model(config: dict[str, Any]) -> SimCLRModel:
    """SimCLRModel from ``{"encoder": {"depth", "width", "small_input"}, "proj_dim"}`` (``model.config``)."""
    if not isinstance(config, dict) or not isinstance(config.get("encoder"), dict) or "proj_dim" not in config:
        raise ValueError(f"model config needs 'encoder' (a dict) and 'proj_dim', got {config!r}")
    enc = config["encoder"]
    unknown = set(enc) - {"depth", "width", "small_input"}
    if unknown:
        raise ValueError(f"unknown encoder config keys {sorted(unknown)} in {config!r}")
    return SimCLRModel(resnet(**enc), config["proj_dim"])


def _check_plain(value: Any, key: str) -> None:
    """Raise ValueError unless ``value`` is built from plain python types only (for weights_only loads)."""
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]")
    elif type(value) is dict:
        for k, item in value.items():
            if type(k) is not str:
                raise ValueError(f"metadata key {key}: dict keys must be str, got {k!r}")
            _check_plain(item, f"{key}[{k!r}]")
    else:
        raise ValueError(f"metadata {key} has type {type(value).__name__}; only str, int, float, bool, "
                         "None, list, tuple and dict are allowed (convert it, e.g. with .item() or .tolist())")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temp file in its directory and ``os.replace``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def save_checkpoint(model: SimCLRModel, path: str | Path, **metadata: Any) -> None:
    """Atomically save config, fp32 CPU state dict and metadata (plus automatic "versions" and "created")."""
    for key, value in metadata.items():
        _check_plain(value, repr(key))
    metadata.update(
        versions={"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                  "python": platform.python_version(),
                  "course_utils": course_utils.__version__},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    state = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    ckpt = {"format": CHECKPOINT_FORMAT, "config": model.config, "state_dict": state, "metadata": metadata}
    atomic_write(Path(path), lambda f: torch.save(ckpt, f))


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint was loaded that is not listed in the ``SHA256SUMS`` beside it: its checksum was not verified."""


_UNREGISTERED = ("warn", "error", "allow")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_checksums(directory: Path) -> dict[str, str]:
    """``{filename: sha256}`` from ``directory/SHA256SUMS`` (``sha256sum`` format); {} when absent."""
    sums_file = directory / CHECKSUM_FILE
    if not sums_file.is_file():
        return {}
    sums = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise ValueError(f"{sums_file}:{n}: expected '<64 hex digits>  <filename>', got {line!r}")
        sums[parts[1].removeprefix("*")] = parts[0].lower()
    return sums


def verify_checksum(path: str | Path) -> str:
    """The file's sha256, checked against its line in the ``SHA256SUMS`` beside it (if it has one).

    A file without a line passes silently (the digest serves as a cache key, e.g. in ``study``); to
    load a checkpoint use ``load_verified``/``load_checkpoint``, which check the bytes they load.

    Raises:
        ValueError: the file does not match its registered checksum, with how to restore it.
    """
    path = Path(path)
    digest = _sha256(path)
    _check_digest(path, digest, "allow")
    return digest


def _check_digest(path: Path, digest: str, unregistered: str) -> None:
    """Compare ``digest`` with the line of ``path`` in the ``SHA256SUMS`` beside it.

    A mismatch always raises ValueError; a file without a line warns, raises or passes by ``unregistered``.
    """
    if unregistered not in _UNREGISTERED:
        raise ValueError(f"unregistered must be one of {_UNREGISTERED}, got {unregistered!r}")
    expected = _read_checksums(path.parent).get(path.name)
    if expected is not None and digest != expected:
        raise ValueError(
            f"checksum mismatch for {path}: the file was modified or is incomplete (e.g. a Git LFS pointer "
            f"or an interrupted download). Restore it with `git checkout -- {path}` (after `git lfs pull` if "
            f"it is stored with Git LFS) or retrain it with `python -m course_utils.train`.")
    if expected is None and unregistered != "allow":
        message = (f"{path} is not registered in {path.parent / CHECKSUM_FILE}, so its checksum is not verified; "
                   f"load only files you trust (register one with course_utils.models.write_checksum)")
        if unregistered == "error":
            raise ValueError(f"{message}; refused because unregistered='error'")
        warnings.warn(f"{message}; pass unregistered='allow' to load your own files silently",
                      UnverifiedCheckpointWarning, stacklevel=4)


def load_verified(path: str | Path, map_location: str | torch.device = "cpu", unregistered: str = "warn",
                  kind: str = "checkpoint") -> tuple[Any, str]:
    """Read a checkpoint file once, verify its sha256, and ``torch.load`` it from those same bytes.

    The one reader of checkpoint files (``load_checkpoint``, ``vlm.load_toy_clip``): the checksum is taken
    of exactly the bytes that are unpickled (no window in which the file could change between check and
    load), and they are loaded with ``weights_only=True`` (tensors and plain python values only).

    Args:
        path: the file.
        map_location: passed to ``torch.load``.
        unregistered: what to do when the file has no line in the ``SHA256SUMS`` beside it: "warn"
            (default; an ``UnverifiedCheckpointWarning``), "error" (ValueError) or "allow" (silently).
        kind: what the file is, for error messages (e.g. "toy CLIP checkpoint").

    Returns:
        (the loaded object, the file's sha256 hex digest).

    Raises:
        FileNotFoundError: no such file.
        ValueError: checksum mismatch with the registered sum; unregistered file with ``unregistered="error"``;
            a file that ``weights_only`` loading cannot read (corrupt, a Git LFS pointer, pickled objects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    _check_digest(path, digest, unregistered)
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read {kind} {path}: file is corrupt or not a {kind} (e.g. a Git LFS "
                         f"pointer, an interrupted download, or pickled objects other than tensors and plain "
                         f"python values, which weights_only loading refuses; {type(exc).__name__})") from exc
    return obj, digest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    unregistered: str = "warn") -> SimCLRModel:
    """Verify (checksum, format, architecture) and load a checkpoint; returns the model in eval mode.

    Args:
        path: a file written by ``save_checkpoint``.
        map_location: device of the returned model.
        unregistered: a file without a line in the ``SHA256SUMS`` beside it cannot be verified:
            "warn" (default) loads it with an ``UnverifiedCheckpointWarning``, "error" raises ValueError,
            "allow" loads it silently (for files you wrote yourself). A registered file whose checksum
            does not match always raises ValueError.
    """
    ckpt, _ = load_verified(path, map_location, unregistered)
    path = Path(path)
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    if not {"format", "config", "state_dict"} <= keys or ckpt["format"] != CHECKPOINT_FORMAT:
        found = f"format {ckpt.get('format')!r}, keys {sorted(map(str, keys))}" if keys else type(ckpt).__name__
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT!r} checkpoint with format, config and state_dict "
                         f"(found {found}); {_TRAIN_HINT}")
    config, stored = ckpt["config"], ckpt["state_dict"]
    try:
        model = build_model(config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} stores an invalid architecture config: {exc}") from exc
    if not isinstance(stored, dict):
        raise ValueError(f"checkpoint {path}: state_dict is a {type(stored).__name__}, not a dict")
    own = model.state_dict()
    problems = ([f"missing {k}" for k in own if k not in stored]
                + [f"unexpected {k}" for k in stored if k not in own]
                + [f"shape {k}: {tuple(getattr(stored[k], 'shape', ()))} vs {tuple(own[k].shape)}" for k in own
                   if k in stored and (not isinstance(stored[k], torch.Tensor) or stored[k].shape != own[k].shape)])
    if problems:
        raise ValueError(f"checkpoint {path} does not match the architecture of its stored config {config}: "
                         f"{len(problems)} problems, first: {problems[:5]}")
    model.load_state_dict(stored, strict=True)
    model.metadata = dict(ckpt.get("metadata") or {})
    return model.to(map_location).eval()


def checkpoint_dir() -> Path:
    """``<repo>/data/checkpoints``: where the course's pretrained checkpoints are committed."""
    return Path(__file__).resolve().parents[1] / "data" / "checkpoints"


def available_pretrained(directory: str | Path | None = None) -> list[str]:
    """Sorted names (file stems) of the ``.pt`` checkpoints registered in ``SHA256SUMS``."""
    sums = _read_checksums(Path(directory) if directory is not None else checkpoint_dir())
    return sorted(Path(name).stem for name in sums if name.endswith(".pt"))


def load_pretrained(name: str, directory: str | Path | None = None) -> SimCLRModel:
    """Load the registered checkpoint ``<directory>/<name>.pt`` (checksum-verified), in eval mode."""
    directory = Path(directory) if directory is not None else checkpoint_dir()
    names = available_pretrained(directory)
    if name not in names:
        listed = f"available: {', '.join(names)}" if names else f"none are committed yet; {_TRAIN_HINT}"
        raise ValueError(f"unknown pretrained checkpoint {name!r} in {directory} ({listed})")
    path = directory / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in {CHECKSUM_FILE} but missing; restore it with "
                                f"`git checkout -- {path}` or {_TRAIN_HINT}")
    return load_checkpoint(path, unregistered="error")


def write_checksum(path: str | Path) -> None:
    """Add or replace the line of ``path`` in the ``SHA256SUMS`` beside it (atomic write)."""
    path = Path(path)
    sums_file = path.parent / CHECKSUM_FILE
    lines = sums_file.read_text().splitlines() if sums_file.is_file() else []
    keep = [line for line in lines
            if line.startswith("#") or not line.strip() or line.split(maxsplit=1)[-1].removeprefix("*") != path.name]
    text = "\n".join([*keep, f"{_sha256(path)}  {path.name}"]) + "\n"
    atomic_write(sums_file, lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------------------------------------------
# Your own model: a torchvision-layout ResNet state dict -> the course's ResNet (DESIGN.md "Your own model")
# --------------------------------------------------------------------------------------------------------------

#: Architectures ``import_encoder`` builds: torchvision name -> depth of the course's ``resnet``.
IMPORT_ARCHS: dict[str, int] = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
#: Prefixes stripped (repeatedly, in any order) from the front of every key: DataParallel/DDP, SSL wrappers,
#: MoCo v1/v2 (``encoder_q.``), MoCo v3 (``base_encoder.``) and ``torch.compile`` (``_orig_mod.``).
IMPORT_PREFIXES: tuple[str, ...] = ("module.", "backbone.", "encoder.", "encoder_q.", "base_encoder.", "model.",
                                    "_orig_mod.")
#: Keys under which checkpoints nest their state dict, tried in this order (Lightning/solo-learn "state_dict",
#: DINO "teacher" before "student").
IMPORT_NESTING: tuple[str, ...] = ("state_dict", "model", "teacher", "student", "model_state_dict", "network",
                                   "net", "encoder", "backbone")
#: lightly's ``nn.Sequential(*list(resnet.children())[:-1])``: child index -> torchvision name.
_LIGHTLY_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_STEM_KEYS = {"conv1": "stem.0", "bn1": "stem.1"}
_SHOWN = 5  # keys named in an error message, per list


class IgnoredKeysWarning(UserWarning):
    """``import_encoder`` ignored keys that are not part of the encoder (heads, momentum encoders, ...)."""


def _nested_state_dict(obj: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """The state dict inside a checkpoint: ``obj`` itself when it holds tensors, else the first of
    ``IMPORT_NESTING`` that does (up to 4 levels). Returns (state dict, the keys followed)."""
    path: list[str] = []
    for _ in range(5):
        if not isinstance(obj, dict):
            raise ValueError(f"{where} holds a {type(obj).__name__}{' under ' + repr('/'.join(path)) if path else ''}"
                             ", not a state dict (a dict of parameter name -> tensor)")
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, path
        key = next((k for k in IMPORT_NESTING if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        path.append(key)
        obj = obj[key]
    shown = sorted(map(str, obj))[:10] if isinstance(obj, dict) else []
    raise ValueError(f"{where} holds no state dict: no tensors{' under ' + repr('/'.join(path)) if path else ''} "
                     f"(keys: {shown}) and none of the usual nesting keys {list(IMPORT_NESTING)}; extract the "
                     "encoder's state dict yourself, e.g. torch.save(ckpt['<key>'], 'encoder.pt')")


def _strip(key: str, prefix: str | None) -> str | None:
    """The key without its wrapper prefixes (``prefix`` only, when given); None when it lacks ``prefix``."""
    if prefix is not None:
        return key[len(prefix):] if key.startswith(prefix) else None
    stripped = True
    while stripped:
        stripped = False
        for p in IMPORT_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


def _course_key(key: str) -> str | None:
    """torchvision (or lightly ``Sequential``) key without prefixes -> the course's ResNet key, or None when the
    key is no part of the encoder (``fc.*``, heads, momentum encoders)."""
    head, _, rest = key.partition(".")
    head = _LIGHTLY_CHILDREN.get(head, head)
    if head in _STEM_KEYS and rest:
        return f"{_STEM_KEYS[head]}.{rest}"
    block, _, name = rest.partition(".")
    if head in ("layer1", "layer2", "layer3", "layer4") and block.isdigit() and name:
        if name.startswith("downsample."):
            name = "shortcut." + name.removeprefix("downsample.")
        return f"{head}.{block}.{name}"
    return None


def _torchvision_key(course_key: str) -> str:
    """The course's ResNet key -> its torchvision name (for error messages)."""
    for tv, course in _STEM_KEYS.items():
        if course_key.startswith(course + "."):
            return tv + course_key[len(course):]
    return course_key.replace(".shortcut.", ".downsample.")


def _guess_arch(keys: set[str], arch: str) -> str:
    """A sentence naming the torchvision ResNet these torchvision-layout keys look like, if not ``arch`` (or '')."""
    blocks = [len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    if not all(blocks):
        return ""
    bottleneck = any(k.endswith(".conv3.weight") for k in keys)
    depth = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
             (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}.get((bottleneck, tuple(blocks)))
    if depth is None:
        return f" The keys have {blocks} blocks per stage ({'Bottleneck' if bottleneck else 'BasicBlock'})."
    if f"resnet{depth}" == arch:
        return ""
    if f"resnet{depth}" in IMPORT_ARCHS:
        return f" They look like a ResNet-{depth}: pass arch='resnet{depth}'."
    return (f" They look like a ResNet-{depth}, which the course's ResNet does not build "
            f"(supported: {', '.join(IMPORT_ARCHS)}).")


def _prefix_hint(keys: list[str]) -> str:
    """Suggest ``prefix=...`` for keys holding an encoder under an unknown prefix (e.g. 'online_net.enc.')."""
    found = sorted({k[:-len("conv1.weight")] for k in keys if k.endswith("conv1.weight")
                    and f"{k[:-len('conv1.weight')]}layer1.0.conv1.weight" in keys})
    found = [p for p in found if p and _strip(p, None) != ""]
    if found:
        return f" The encoder seems to sit under {found[0]!r}: pass prefix={found[0]!r}."
    return (f" If its keys carry a prefix other than {', '.join(IMPORT_PREFIXES)}, pass it as prefix='...' "
            "(the part before 'conv1.weight').")


def _encoder_state(state: dict[str, Any], arch: str, prefix: str | None, own: dict[str, torch.Tensor],
                   where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a torchvision-layout state dict onto ``own`` (the course ResNet's state dict).

    Returns (state dict for ``load_state_dict``, the ignored source keys).
    Raises ValueError naming missing, unexpected and mis-shaped keys."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored, unexpected, stripped_keys = [], [], set()
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            ignored.append(str(key))
            continue
        bare = _strip(key, prefix)
        target = None if bare is None else _course_key(bare)
        if target is None:
            ignored.append(key)
            continue
        stripped_keys.add(_torchvision_key(target))
        if target not in own:
            unexpected.append(key)
            continue
        if target in mapped:
            raise ValueError(f"{where}: keys {origin[target]!r} and {key!r} both map to the encoder's "
                             f"{_torchvision_key(target)!r} (two encoders in one state dict); choose one with "
                             "prefix='...' (e.g. the part of the first key before 'conv1.weight')")
        mapped[target], origin[target] = value, key
    missing = [k for k in own if k not in mapped and not k.startswith("normalize.")
               and not k.endswith("num_batches_tracked")]  # old checkpoints lack the BN step counter
    shapes = [f"{origin[k]}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} expected"
              for k, v in mapped.items() if v.shape != own[k].shape]
    if missing or unexpected or shapes:
        name = f"ResNet-{IMPORT_ARCHS[arch]}"
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder keys are missing (first: "
                         f"{', '.join(_torchvision_key(k) for k in missing[:_SHOWN])})")
        if unexpected:
            parts.append(f"{len(unexpected)} encoder keys are unexpected (first: {', '.join(unexpected[:_SHOWN])})")
        if shapes:
            parts.append(f"{len(shapes)} keys have the wrong shape (first: {'; '.join(shapes[:_SHOWN])})")
        hint = _guess_arch(stripped_keys, arch)
        if not hint and len(missing) > len(own) // 2:
            hint = (_prefix_hint([str(k) for k in state]) + f" Keys found: {len(state)} (first: "
                    f"{', '.join(map(str, list(state)[:_SHOWN]))}).")
        if shapes and not hint:
            hint = (" A 3x3 conv1 is a CIFAR-style stem, a wider layer a Wide ResNet: import_encoder builds "
                    "torchvision's ImageNet ResNet.")
        raise ValueError(f"{where} does not fit a torchvision {name} encoder (arch={arch!r}): "
                         f"{'; '.join(parts)}.{hint}")
    return mapped, ignored


def _ignored_summary(ignored: list[str]) -> str:
    """'projector.* (6), momentum_backbone.* (320)': ignored keys grouped by their first component."""
    groups: dict[str, int] = {}
    for key in ignored:
        bare = _strip(key, None)
        first, dot, _ = bare.partition(".")
        group = key[:len(key) - len(bare)] + first + (".*" if dot else "")
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in groups.items())


def import_encoder(source: nn.Module | dict[str, Any] | str | os.PathLike, arch: str = "resnet50",
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                   prefix: str | None = None) -> ResNet:
    """The course's ResNet (ImageNet stem) with the weights of your own torchvision-layout ResNet encoder.

    The returned encoder maps images float [B, 3, H, W] in [0, 1] (any H, W >= 32; 224 px is the ImageNet
    size) to features h [B, 2048] (ResNet-50) or [B, 512] (ResNet-18/34): its ``Normalize`` layer applies
    ``mean``/``std``, so its features equal those of the torchvision ResNet with ``fc = nn.Identity()`` on
    images normalised with the same mean and std. Every explainer of the course runs on it (its stages are
    ``.layer1`` ... ``.layer4``, e.g. ``gradcam(encoder, encoder.layer4, x, feature(0))``).

    Weights are never downloaded: pass a file you have (any path), a state dict or a module.

    Supported layouts (keys are matched after stripping ``IMPORT_PREFIXES`` repeatedly from their front:
    ``module.``, ``backbone.``, ``encoder.``, ``encoder_q.``, ``base_encoder.``, ``model.``, ``_orig_mod.``):

    * torchvision ``resnet18/34/50().state_dict()`` (also timm's ResNets, Barlow Twins, VICReg, SwAV, DINO
      backbone releases): ``conv1``, ``bn1``, ``layerX.Y.{conv,bn}N``, ``layerX.Y.downsample.{0,1}``;
    * a ``torchvision.models.ResNet`` module (or any module with such a state dict, e.g. wrapped in
      ``DataParallel``);
    * DataParallel/DDP ``module.``; SimSiam ``module.encoder.``; MoCo v1/v2 ``module.encoder_q.``
      (``encoder_k.*`` ignored); MoCo v3 ``module.base_encoder.`` (``momentum_encoder.*`` ignored);
    * solo-learn / PyTorch Lightning: ``{"state_dict": {"backbone.conv1.weight", ..., "projector.*",
      "classifier.*", "momentum_backbone.*"}}``;
    * lightly: ``backbone = nn.Sequential(*list(resnet.children())[:-1])``, keys ``backbone.0.*`` (conv1),
      ``backbone.1.*`` (bn1), ``backbone.4.*`` ... ``backbone.7.*`` (layer1 ... layer4);
    * DINO training checkpoints ``{"teacher": ..., "student": ...}`` (the teacher is used);
    * checkpoints nesting the state dict under one of ``IMPORT_NESTING`` (``state_dict``, ``model``,
      ``teacher``, ``student``, ...), up to 4 levels deep;
    * anything else via ``prefix=``: only keys starting with it are used, with it removed.

    Keys that are no part of the encoder (``fc``, projector, predictor, classifier, DINO heads, momentum or key
    encoders) are ignored: ``fc.*`` silently (the supervised classifier), any others with one
    ``IgnoredKeysWarning`` that groups them by name. The returned encoder's ``import_info`` dict records
    ``arch``, ``nesting`` (keys followed into the checkpoint), ``loaded`` (number of tensors) and ``ignored``
    (the ignored keys).

    Args:
        source: a state dict (parameter name -> tensor) or a checkpoint dict nesting one; a path of a file
            holding either (read with ``torch.load(weights_only=True)``, on the CPU); or an ``nn.Module``.
        arch: "resnet18", "resnet34" or "resnet50" (ResNet-50 has Bottleneck blocks, the others BasicBlocks).
        mean, std: the per-channel input normalisation the weights were trained with (ImageNet by default).
        prefix: use only the keys starting with this prefix, removed (instead of the automatic stripping).

    Returns:
        ``ResNet`` in eval mode, float32, on the CPU (move it with ``.to(device)``).

    Raises:
        ValueError: unknown ``arch``; a state dict that does not fit (the message names the first missing,
            unexpected and mis-shaped keys with their counts, and the arch the keys look like, or the prefix
            to pass); a file that is not a weights-only checkpoint (e.g. a DINO or Lightning checkpoint that
            pickles training arguments: extract its state dict in trusted code first).
        FileNotFoundError: no such file.
        TypeError: ``source`` is none of the above.
    """
    arch_key = arch.lower().replace("-", "").replace("_", "") if isinstance(arch, str) else arch
    if arch_key not in IMPORT_ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; import_encoder builds {', '.join(IMPORT_ARCHS)}")
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise ValueError(f"prefix must be a non-empty string such as 'online_network.encoder.', got {prefix!r}")
    if isinstance(source, nn.Module):
        where, obj = f"the {type(source).__name__} module's state dict", source.state_dict()
    elif isinstance(source, (str, os.PathLike)):
        where = f"file {os.fspath(source)}"
        try:
            obj, _ = load_verified(source, "cpu", unregistered="allow", kind="encoder checkpoint")
        except ValueError as exc:
            raise ValueError(f"{exc}. A training checkpoint that pickles its arguments (DINO's 'args', "
                             "Lightning's hyper_parameters) cannot be read with weights_only=True: if you trust "
                             "the file, save its state dict alone first, e.g. torch.save(torch.load(path, "
                             "weights_only=False)['teacher'], 'encoder.pt')") from exc
    elif isinstance(source, dict):
        where, obj = "the state dict", source
    else:
        raise TypeError(f"source must be a state dict, a checkpoint path or an nn.Module, got {type(source).__name__}")
    state, nesting = _nested_state_dict(obj, where)
    if nesting:
        where = f"{where} (under {'/'.join(nesting)!r})"
    encoder = resnet(IMPORT_ARCHS[arch_key], 64, small_input=False, mean=mean, std=std)
    own = encoder.state_dict()
    mapped, ignored = _encoder_state(state, arch_key, prefix, own, where)
    for key, value in own.items():  # the normalisation buffers and absent BN counters keep their values
        mapped.setdefault(key, value)
    with torch.no_grad():
        encoder.load_state_dict({k: v.detach().to("cpu") for k, v in mapped.items()}, strict=True)
    heads = [k for k in ignored if (_strip(k, prefix) or "").split(".")[0] not in ("fc", "9")]  # fc: silently
    if heads:
        warnings.warn(f"import_encoder: {where}: ignored {len(heads)} keys that are no part of the "
                      f"{arch_key} encoder: {_ignored_summary(heads)}", IgnoredKeysWarning, stacklevel=2)
    encoder.import_info = {"arch": arch_key, "nesting": nesting, "loaded": len(mapped), "ignored": ignored}
    return encoder.float().eval()
