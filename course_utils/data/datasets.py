"""Image classification data sets behind one function, ``load_dataset``.

Every data set comes back with the interface of ``ShapesWorld``:

* ``.images``: uint8 [N, 3, H, W] (grey-scale images are repeated to 3 channels),
* ``.labels``: int64 [N] (-1 for unlabelled images),
* ``.classes``: list[str], the class names, indexed by label,
* ``ds[i]``: (float [3, H, W] in [0, 1], int label).

Real data sets are read from files on disk by the small readers below (idx,
CIFAR pickles, STL-10 binaries, image folders); torchvision is only used to
*download* the files when asked to with ``download=True``.  Files are looked up
in ``root`` or, when no root is given, in ``default_data_root()``
(``$COURSE_DATA_ROOT`` or ``<repo>/data/cache``) and, for Fashion-MNIST, in
the folder where the Debian package ``dataset-fashion-mnist`` installs it.

``example_photographs`` returns a few real colour photographs (float [N, 3, size, size] in
[0, 1]) from the files bundled inside the scikit-image package, offline.
"""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .shapes import SPLITS as SHAPES_SPLITS
from .shapes import ShapesWorld

#: Where the Debian package ``dataset-fashion-mnist`` installs the four gzipped idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: Valid splits of each data set; "folder" accepts any split (see ``load_dataset``).
DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "shapes": SHAPES_SPLITS,
    "shapes-spurious": SHAPES_SPLITS,
    "fashion-mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "stl10": ("train", "test", "unlabeled"),
    "folder": (),
}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_READ_CHUNK = 1 << 22  # bytes read at once from an idx file
#: Largest idx data accepted (bytes); Fashion-MNIST's largest file holds 47 MB.  Checked before allocating.
_IDX_MAX_BYTES = 1 << 30
#: Deflate expands at most ~1032-fold, so a .gz idx file cannot hold more data than this times its size.
_GZIP_MAX_RATIO = 1100
_IDX_FIX = (
    "re-install it (sudo apt-get install --reinstall dataset-fashion-mnist, for the Debian package's files) "
    'or delete it and download it again (load_dataset("fashion-mnist", download=True))'
)
#: The only globals a CIFAR-10 python pickle may name: numpy's ndarray reconstruction (numpy 1 and 2
#: spellings) and the latin-1 encoding Python 3 uses for bytes in protocol-2 pickles.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})
_CIFAR_FIX = 'delete it and extract cifar-10-python.tar.gz again (or load_dataset("cifar10", download=True))'
_STL_NAMES_MAX_BYTES = 1 << 16  # class_names.txt of STL-10 has 10 short lines
_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE
_STL_CHUNK = 2048  # STL-10 images transposed at once
_RESIZE_CHUNK = 1024  # images resized at once


class ImageTensorDataset(torch.utils.data.Dataset):
    """Images and labels held in memory as tensors.

    Args:
        images: uint8 [N, 3, H, W].
        labels: int64 [N], class indices into ``classes`` or -1 for unlabelled images.
        classes: class names.
        name: data set name, e.g. "fashion-mnist".
        split: split name, e.g. "train".
        source: a sentence saying which files the data came from.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        name: str,
        split: str,
        source: str,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}.")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be int64 [N] with N = {images.shape[0]} images, got {labels.dtype} {list(labels.shape)}."
            )
        if labels.numel() and not (-1 <= int(labels.min()) and int(labels.max()) < len(classes)):
            raise ValueError(f"labels must lie in [-1, {len(classes) - 1}] for {len(classes)} classes.")
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns (float [3, H, W] in [0, 1], int label; -1 when unlabelled)."""
        return self.images[index].float() / 255.0, int(self.labels[index])

    def __repr__(self) -> str:
        height, width = self.images.shape[2:]
        return (
            f"ImageTensorDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"size={height}x{width}, classes={len(self.classes)})"
        )


def default_data_root() -> Path:
    """``$COURSE_DATA_ROOT`` if set, else ``<repo>/data/cache`` (repo = the folder holding ``course_utils``)."""
    env = os.environ.get("COURSE_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data" / "cache"


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    **options,
) -> ImageTensorDataset | ShapesWorld:
    """Load a data set by name; images are uint8 [N, 3, H, W], labels int64 [N].

    Args:
        name: one of
            "shapes": ``ShapesWorld(split=split, **options)`` (options n, size,
                seed, spurious, difficulty; n defaults to 10_000), generated,
                so ``root`` and ``download`` are ignored.
            "shapes-spurious": the same with ``spurious`` defaulting to 0.9.
            "fashion-mnist": 60000 train / 10000 test grey-scale 28x28 images,
                repeated to 3 channels, from the four idx files (plain or .gz)
                in ``root``, ``root/FashionMNIST/raw`` or ``root/fashion-mnist``.
            "cifar10": 50000 train / 10000 test 32x32 images from the python
                pickles in ``<root>/cifar-10-batches-py``.
            "stl10": 5000 train / 8000 test / 100000 unlabeled 96x96 images
                from the binaries in ``<root>/stl10_binary``.
            "folder": your own images in ``root/<class_name>/*.png`` (also jpg,
                jpeg, bmp, webp; sub-folders of a class folder are included).
                ``split`` is ignored unless ``root/<split>/`` exists, in which
                case that folder is used (if only other split folders such as
                ``root/train`` exist, FileNotFoundError); classes are the sorted
                folder names.
        split: "train", "test", "val" (shapes), "unlabeled" (stl10, labels -1).
        root: folder holding the files (required for "folder").  When None,
            ``default_data_root()`` is searched and, for Fashion-MNIST, also
            ``DEBIAN_FASHION_MNIST``.
        download: if the files are not found, fetch them with torchvision into
            ``root or default_data_root()`` (needs internet).  Files that are
            already there are used without any download.
        **options: "shapes*": keyword arguments of ``ShapesWorld``.  Others:
            ``size`` (int), the side of the returned images: a bilinear,
            antialiased resize for the square data sets; for "folder" (default
            64) the short side is resized to ``size``, then the centre is
            cropped to size x size.

    Returns:
        ``ShapesWorld`` for "shapes*", else ``ImageTensorDataset``.

    Raises:
        ValueError: unknown name, split or option value; malformed files (the message names the
            file and how to replace it), e.g. a truncated idx file or one whose header announces
            more data than it holds, a CIFAR-10 pickle naming anything but numpy arrays (refused
            unread: it could run code), a binary STL-10 class_names.txt.
        TypeError: unknown options.
        FileNotFoundError: the files are missing (the message lists the folders
            searched and how to get the data).
        RuntimeError: ``download=True`` failed (e.g. no internet access).
    """
    if name not in DATASET_SPLITS:
        raise ValueError(f"Unknown data set {name!r}; choose one of: {', '.join(DATASET_SPLITS)}.")
    valid_splits = DATASET_SPLITS[name]
    if valid_splits and split not in valid_splits:
        raise ValueError(f"Unknown split {split!r} for {name!r}; choose one of: {', '.join(valid_splits)}.")
    if name in ("shapes", "shapes-spurious"):
        options.setdefault("n", 10_000)
        if name == "shapes-spurious":
            options.setdefault("spurious", 0.9)
        return ShapesWorld(split=split, **options)

    unknown = set(options) - {"size"}
    if unknown:
        raise TypeError(f"load_dataset({name!r}) got unknown options {sorted(unknown)}; it accepts only 'size'.")
    size = options.get("size")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if name == "folder":
        if root is None:
            raise ValueError('load_dataset("folder") needs root=<folder with one sub-folder of images per class>.')
        return _load_folder(Path(root), split, 64 if size is None else size)

    base = Path(root) if root is not None else default_data_root()
    folders = _candidate_folders(name, base, search_debian=root is None)
    needed = _required_files(name, split)
    found = _locate(folders, needed)
    if found is None and download:
        _download(name, base)
        found = _locate(folders, needed)
    if found is None:
        raise FileNotFoundError(_missing_message(name, split, folders, needed))
    reader = {"fashion-mnist": _read_fashion_mnist, "cifar10": _read_cifar10, "stl10": _read_stl10}[name]
    return reader(*found, split, size)


#: The colour photographs bundled inside the scikit-image wheel (``skimage/data/``; read from there, no download),
#: name -> (file, source and licence as scikit-image's ``skimage.data`` docstrings state them).
EXAMPLE_PHOTOGRAPHS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.png", "Eileen Collins, NASA Great Images database; public domain"),
    "cat": ("chelsea.png", "Chelsea the cat, by Stefan van der Walt; CC0"),
    "coffee": ("coffee.png", "coffee cup, by Rachel Michetti (courtesy of Pikolo Espresso Bar); CC0"),
    "rocket": ("rocket.jpg", "launch of DSCOVR on Falcon 9, SpaceX; released into the public domain"),
}


def example_photographs(size: int = 224, names: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """A few real colour photographs, offline: float [N, 3, size, size] in [0, 1] and their names.

    The images are files shipped inside the scikit-image package (``skimage/data/``), read directly with
    PIL, so nothing is downloaded (scikit-image's ``pooch`` fetcher is not used). Each image's short side
    is resized to ``size`` (bilinear, antialiased), then its centre is cropped to ``size`` x ``size``, as
    ImageNet models expect at ``size=224``. Sources and licences (from scikit-image's ``skimage.data``):

    * "astronaut": the astronaut Eileen Collins, NASA Great Images database; public domain (no known
      copyright restrictions).
    * "cat": Chelsea the cat, photograph by Stefan van der Walt; CC0.
    * "coffee": a coffee cup, photograph by Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0.
    * "rocket": the launch of DSCOVR on a Falcon 9, photograph by SpaceX, released into the public domain.

    Args:
        size: side of the returned square images (positive int).
        names: which photographs, in this order (default: all, in the order above).

    Returns:
        (images float32 [N, 3, size, size] in [0, 1], names).

    Raises:
        ImportError: scikit-image is not installed (``pip install scikit-image``).
        ValueError: unknown names or a bad size.
        FileNotFoundError: the installed scikit-image lacks a bundled file.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    names = list(EXAMPLE_PHOTOGRAPHS) if names is None else list(names)
    unknown = [n for n in names if n not in EXAMPLE_PHOTOGRAPHS]
    if unknown or not names:
        raise ValueError(f"unknown photograph names {unknown}; choose from {', '.join(EXAMPLE_PHOTOGRAPHS)}.")
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ImportError("example_photographs reads the photographs bundled with scikit-image, which is not "
                          "installed: pip install scikit-image (or `make setup`), or use your own images "
                          '(load_dataset("folder", root=...)).')
    folder = Path(spec.origin).parent / "data"
    images = torch.empty((len(names), 3, size, size), dtype=torch.float32)
    for i, name in enumerate(names):
        path = folder / EXAMPLE_PHOTOGRAPHS[name][0]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: this scikit-image installation does not bundle the "
                                    f"{name!r} photograph; reinstall it (pip install --force-reinstall scikit-image).")
        images[i] = torch.from_numpy(_square_image(path, size)).permute(2, 0, 1).float() / 255.0
    return images, names


def dataset_status(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Which data sets can be loaded here, and from where (the train split is checked).

    Returns:
        name -> "found in <folder>" or "not found (looked in ...); how to get it".
    """
    base = Path(root) if root is not None else default_data_root()
    status = {"shapes": "built in (generated on the fly, no files needed)"}
    hints = {
        "fashion-mnist": "apt-get install dataset-fashion-mnist, or download=True",
        "cifar10": "extract cifar-10-python.tar.gz into the data root, or download=True",
        "stl10": "extract stl10_binary.tar.gz into the data root, or download=True",
    }
    for name, hint in hints.items():
        folders = _candidate_folders(name, base, search_debian=root is None)
        found = _locate(folders, _required_files(name, "train"))
        status[name] = (
            f"found in {found[0]}" if found else f"not found (looked in {', '.join(map(str, folders))}); {hint}"
        )
    return status


# --------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------

def _candidate_folders(name: str, base: Path, search_debian: bool) -> list[Path]:
    """Folders searched for a data set, in order of preference."""
    if name == "fashion-mnist":
        folders = [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
        return folders + [DEBIAN_FASHION_MNIST] if search_debian else folders
    if name == "cifar10":
        return [base / "cifar-10-batches-py", base]
    return [base / "stl10_binary", base]


def _required_files(name: str, split: str) -> list[tuple[str, ...]]:
    """The files one split needs, each as its accepted names in order of preference."""
    if name == "fashion-mnist":
        prefix = "train" if split == "train" else "t10k"
        return [(f, f"{f}.gz") for f in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")]
    if name == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return [(f,) for f in (*batches, "batches.meta")]
    labels = [] if split == "unlabeled" else [f"{split}_y.bin"]
    return [(f,) for f in (f"{split}_X.bin", *labels, "class_names.txt")]


def _describe(names: tuple[str, ...]) -> str:
    """("a", "a.gz") -> "a[.gz]"; ("a",) -> "a"."""
    return names[0] + "".join(f"[{n[len(names[0]):]}]" for n in names[1:])


def _resolve(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``folder/name`` that is a file, else None."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _locate(folders: list[Path], needed: list[tuple[str, ...]]) -> tuple[Path, list[Path]] | None:
    """The first folder holding every needed file, with their paths (in the order of ``needed``)."""
    for folder in folders:
        paths = [_resolve(folder, names) for names in needed]
        if all(paths):
            return folder, paths
    return None


def _missing_message(name: str, split: str, folders: list[Path], needed: list[tuple[str, ...]]) -> str:
    """Where we looked, what was missing there, and how to get the data."""
    lines = [f"{name} ({split} split) not found. Looked for {', '.join(map(_describe, needed))} in:"]
    for folder in folders:
        if not folder.is_dir():
            lines.append(f"  {folder}  (folder does not exist)")
        else:
            missing = [_describe(names) for names in needed if _resolve(folder, names) is None]
            lines.append(f"  {folder}  (missing: {', '.join(missing)})")
    env = os.environ.get("COURSE_DATA_ROOT")
    env_note = f"currently {env!r}" if env else f"unset, so the default is {default_data_root()}"
    lines.append("To get the data, do one of:")
    if name == "fashion-mnist":
        lines += [
            f"  - install the Debian package (puts the files in {DEBIAN_FASHION_MNIST}): "
            "sudo apt-get install dataset-fashion-mnist",
            '  - download it with torchvision (needs internet): load_dataset("fashion-mnist", download=True)',
            "  - copy the four idx files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte (plain or .gz) into a folder and pass it as root=<folder>",
        ]
    else:
        archive, folder_name = (
            ("cifar-10-python.tar.gz", "cifar-10-batches-py") if name == "cifar10"
            else ("stl10_binary.tar.gz", "stl10_binary")
        )
        lines += [
            f'  - download it with torchvision (needs internet): load_dataset("{name}", download=True)',
            f"  - extract the official archive {archive} into <root>, which creates <root>/{folder_name}/, "
            "and pass root=<root>",
        ]
    lines.append(f"  - or put the files under $COURSE_DATA_ROOT ({env_note}) and leave root=None.")
    return "\n".join(lines)


def _download(name: str, target: Path) -> None:
    """Fetch the files of a data set into ``target`` with torchvision.

    torchvision downloads every split at once but also parses the split it was
    asked for, so the smallest split is requested; the files are then read by
    this module's readers.
    """
    import torchvision  # imported here: slow to import and only needed to download

    target.mkdir(parents=True, exist_ok=True)
    try:
        if name == "fashion-mnist":
            torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        elif name == "cifar10":
            torchvision.datasets.CIFAR10(str(target), train=False, download=True)
        else:
            torchvision.datasets.STL10(str(target), split="train", download=True)
    except (OSError, RuntimeError, http.client.HTTPException) as error:  # urllib's URLError is an OSError
        manual = {
            "fashion-mnist": "sudo apt-get install dataset-fashion-mnist, or copy the four idx files into "
            "a folder and pass root=<folder>",
            "cifar10": "extract cifar-10-python.tar.gz into <root> (creating <root>/cifar-10-batches-py) "
            "and pass root=<root>",
            "stl10": "extract stl10_binary.tar.gz into <root> (creating <root>/stl10_binary) and pass root=<root>",
        }[name]
        raise RuntimeError(
            f"Downloading {name} into {target} failed:\n{str(error).strip()}\nThere seems to be no internet "
            f"access on this machine; get the files manually instead: {manual}."
        ) from error


# --------------------------------------------------------------------------
# Fashion-MNIST: idx files
# --------------------------------------------------------------------------

def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (plain or gzipped): uint8 array with the dims of its header.

    The header is checked before any memory is allocated: the magic number (data type and number of
    dims), the product of the dims against ``_IDX_MAX_BYTES`` and against the file size (exactly for a
    plain file; for a .gz file against the most its compressed size can expand to).

    Raises:
        ValueError: wrong magic number, absurd or inconsistent header, truncated or oversized data, a
            corrupt gzip file; the message names the file and how to replace it.
    """
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    gzipped = path.suffix == ".gz"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            found = int.from_bytes(head, "big")
            if len(head) < 4 or found != magic:
                raise ValueError(
                    f"{path} is not an idx {kind} file: magic number {found}, expected {magic}; {_IDX_FIX}."
                )
            ndim = magic & 0xFF
            dims_bytes = f.read(4 * ndim)
            if len(dims_bytes) < 4 * ndim:
                raise ValueError(
                    f"{path} is truncated: its header ends after {4 + len(dims_bytes)} bytes; {_IDX_FIX}."
                )
            dims = tuple(int(d) for d in np.frombuffer(dims_bytes, ">u4"))
            n_bytes = math.prod(dims)
            if n_bytes > _IDX_MAX_BYTES:
                raise ValueError(
                    f"{path} has an absurd header: dims {dims} announce {n_bytes} bytes of data, more than the "
                    f"{_IDX_MAX_BYTES} this reader accepts (Fashion-MNIST needs 47 MB); the file is corrupt or "
                    f"not Fashion-MNIST: {_IDX_FIX}."
                )
            file_bytes, expected = path.stat().st_size, 4 + 4 * ndim + n_bytes
            if not gzipped and file_bytes != expected:
                problem = "is truncated" if file_bytes < expected else "has more data than its header announces"
                raise ValueError(
                    f"{path} {problem}: its header (dims {dims}) announces {expected} bytes, the file has "
                    f"{file_bytes}; {_IDX_FIX}."
                )
            if gzipped and n_bytes > _GZIP_MAX_RATIO * file_bytes:
                raise ValueError(
                    f"{path} is truncated: its header (dims {dims}) announces {n_bytes} bytes of data, more than "
                    f"{file_bytes} gzipped bytes can hold; {_IDX_FIX}."
                )
            data = np.empty(dims, np.uint8)
            view = memoryview(data.reshape(-1))
            filled = 0
            while filled < len(view):
                count = f.readinto(view[filled:filled + _READ_CHUNK])
                if not count:
                    raise ValueError(
                        f"{path} is truncated: its header announces {len(view)} bytes of data "
                        f"(dims {dims}), found {filled}; {_IDX_FIX}."
                    )
                filled += count
            if f.read(1):
                raise ValueError(f"{path} has more data than its header announces (dims {dims}); {_IDX_FIX}.")
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is a corrupt gzip file: {error}; {_IDX_FIX}.") from error
    return data


def _read_fashion_mnist(folder: Path, files: list[Path], split: str, size: int | None) -> ImageTensorDataset:
    images_path, labels_path = files
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)  # [N, H, W]
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)  # [N]
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path} has label {labels.max()}; Fashion-MNIST labels are 0..9.")
    kinds = sorted({"gzipped" if p.suffix == ".gz" else "plain" for p in files})
    grey, note = _resize(torch.from_numpy(images)[:, None], size)  # resized before the channels are repeated
    return ImageTensorDataset(
        images=grey.expand(-1, 3, -1, -1).contiguous(),
        labels=torch.from_numpy(labels).long(),
        classes=FASHION_MNIST_CLASSES,
        name="fashion-mnist",
        split=split,
        source=f"Fashion-MNIST {split} from {folder} ({' and '.join(kinds)} idx files){note}",
    )


# --------------------------------------------------------------------------
# CIFAR-10: python pickles
# --------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 python batches that builds nothing but their plain structure.

    The official files hold dicts, lists, bytes, ints and uint8 numpy arrays.  ``find_class`` lets
    through only ``_CIFAR_PICKLE_GLOBALS`` (numpy's array reconstruction, non-object dtypes, latin-1
    bytes); any other global, e.g. ``os.system`` in a crafted file, raises ValueError naming the
    file and the global before anything is called.
    """

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # written by Python 2: str -> bytes
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise ValueError(
                f"{self.path} is not a plain CIFAR-10 pickle: it names the global {module}.{name}, which a "
                f"CIFAR-10 batch never contains (refused: unpickling it could run code); {_CIFAR_FIX}."
            )
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        if (module, name) == ("numpy", "dtype"):
            return self._plain_dtype
        return super().find_class(module, name)

    def _latin1_encode(self, text, encoding="utf-8", errors="strict") -> bytes:
        """``_codecs.encode`` as Python 3 pickles bytes at protocol 2; only latin-1 of a str."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise ValueError(
                f"{self.path} is not a plain CIFAR-10 pickle: unexpected _codecs.encode call; {_CIFAR_FIX}."
            )
        return text.encode("latin-1")

    def _plain_dtype(self, *args) -> np.dtype:
        """``numpy.dtype``, refusing object dtypes (arrays of arbitrary python objects)."""
        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise ValueError(f"{self.path} is not a plain CIFAR-10 pickle: it holds an object array; {_CIFAR_FIX}.")
        return dtype


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle (written by Python 2, hence the bytes keys) as a dict, read with ``_CifarUnpickler``.

    Raises:
        ValueError: the file names a forbidden global, or is not a readable CIFAR-10 pickle.
    """
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"{path} is not a readable CIFAR-10 pickle: {error}; {_CIFAR_FIX}.") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a CIFAR-10 pickle: it holds a {type(content).__name__}, not a dict.")
    return content


def _read_cifar10(folder: Path, files: list[Path], split: str, size: int | None) -> ImageTensorDataset:
    *batches, meta_path = files
    images, labels = [], []
    for path in batches:
        batch = _unpickle(path)
        data, batch_labels = batch.get(b"data"), batch.get(b"labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path} is not a CIFAR-10 batch: b'data' must be uint8 [N, 3072].")
        if batch_labels is None or len(batch_labels) != data.shape[0]:
            raise ValueError(f"{path} has {data.shape[0]} images but its b'labels' do not match.")
        images.append(data.reshape(-1, 3, 32, 32))  # rows of 1024 R, 1024 G, 1024 B values, each row-major
        labels.append(np.asarray(batch_labels, np.int64))
        del batch
    meta = _unpickle(meta_path)
    if b"label_names" not in meta:
        raise ValueError(f"{meta_path} has no b'label_names'.")
    classes = [c.decode() for c in meta[b"label_names"]]
    images_tensor, note = _resize(torch.from_numpy(images[0] if len(images) == 1 else np.concatenate(images)), size)
    return ImageTensorDataset(
        images=images_tensor,
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
        name="cifar10",
        split=split,
        source=f"CIFAR-10 {split} from {folder} (python pickles {', '.join(p.name for p in batches)}){note}",
    )


# --------------------------------------------------------------------------
# STL-10: binaries
# --------------------------------------------------------------------------

def _read_stl10(folder: Path, files: list[Path], split: str, size: int | None) -> ImageTensorDataset:
    x_path, *y_paths, names_path = files
    n_bytes = x_path.stat().st_size
    if n_bytes % _STL_IMAGE_BYTES:
        raise ValueError(
            f"{x_path} has {n_bytes} bytes, not a multiple of 3*96*96 = {_STL_IMAGE_BYTES}; "
            "it is truncated or not an STL-10 image file."
        )
    n = n_bytes // _STL_IMAGE_BYTES
    images = torch.empty((n, 3, _STL_SIDE, _STL_SIDE), dtype=torch.uint8)
    with open(x_path, "rb") as f:  # stored column-major: [N, 3, W, H]; read in chunks to bound memory
        for start in range(0, n, _STL_CHUNK):
            count = min(_STL_CHUNK, n - start)
            chunk = np.fromfile(f, np.uint8, count=count * _STL_IMAGE_BYTES)
            chunk = chunk.reshape(count, 3, _STL_SIDE, _STL_SIDE)
            images[start:start + count] = torch.from_numpy(chunk).transpose(2, 3)
    classes = _read_class_names(names_path)
    if y_paths:
        y = np.fromfile(y_paths[0], np.uint8)
        if y.shape[0] != n:
            raise ValueError(f"{x_path} holds {n} images but {y_paths[0]} holds {y.shape[0]} labels.")
        if y.size and (y.min() < 1 or y.max() > len(classes)):
            raise ValueError(f"{y_paths[0]} has labels outside 1..{len(classes)}.")
        labels = torch.from_numpy(y.astype(np.int64) - 1)
    else:
        labels = torch.full((n,), -1, dtype=torch.int64)
    images, note = _resize(images, size)
    return ImageTensorDataset(
        images=images,
        labels=labels,
        classes=classes,
        name="stl10",
        split=split,
        source=f"STL-10 {split} from {folder} ({', '.join(p.name for p in files)}){note}",
    )


def _read_class_names(path: Path) -> list[str]:
    """STL-10's class_names.txt: one printable UTF-8 name per line (at most ``_STL_NAMES_MAX_BYTES``).

    Raises:
        ValueError: the file is too large, not UTF-8 text, holds control characters or no names.
    """
    fix = 'delete stl10_binary and extract stl10_binary.tar.gz again (or load_dataset("stl10", download=True))'
    size = path.stat().st_size
    if size > _STL_NAMES_MAX_BYTES:
        raise ValueError(f"{path} has {size} bytes; STL-10's class_names.txt is a short text file "
                         f"(at most {_STL_NAMES_MAX_BYTES} bytes accepted): {fix}.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not a text file (not UTF-8: {error.reason} at byte {error.start}): {fix}."
        ) from error
    classes = [line.strip() for line in text.splitlines() if line.strip()]
    bad = next((name for name in classes if not name.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{path} is not a text file of class names (it holds control characters, e.g. in "
                         f"{bad[:20]!r}): {fix}.")
    if not classes:
        raise ValueError(f"{path} holds no class names: {fix}.")
    return classes


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------

def _load_folder(root: Path, split: str, size: int) -> ImageTensorDataset:
    """ImageFolder layout ``root[/split]/<class_name>/**/*.png``: RGB, short side -> size, centre crop."""
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist; expected {root}/<class_name>/*.png.")
    folder = root / split
    if not folder.is_dir():
        split_folders = [s for s in ("train", "val", "valid", "test") if (root / s).is_dir()]
        if split_folders:
            raise FileNotFoundError(
                f"{root} has split folders {split_folders} but no {split!r} folder; pass one of them as split."
            )
        folder = root
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    expected = (
        f"expected {folder}/<class_name>/<image> with one folder per class, images ending in "
        f"{', '.join(IMAGE_EXTENSIONS)}"
    )
    if not classes:
        raise FileNotFoundError(f"No class folders in {folder}; {expected}.")
    samples: list[tuple[Path, int]] = []
    for label, class_name in enumerate(classes):
        paths = sorted(
            p for p in (folder / class_name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not paths:
            raise FileNotFoundError(f"Class folder {folder / class_name} holds no images; {expected}.")
        samples += [(p, label) for p in paths]
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = torch.from_numpy(_square_image(path, size)).permute(2, 0, 1)
    return ImageTensorDataset(
        images=images,
        labels=torch.tensor([label for _, label in samples], dtype=torch.int64),
        classes=classes,
        name="folder",
        split=split,
        source=(
            f"image folder {folder} ({len(samples)} images in {len(classes)} classes, "
            f"short side resized to {size} and centre-cropped to {size}x{size})"
        ),
    )


def _square_image(path: Path, size: int) -> np.ndarray:
    """One image as RGB uint8 [size, size, 3]: short side resized to size, then centre-cropped."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as error:
        raise ValueError(f"Cannot read image {path}: {error}") from error
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


# --------------------------------------------------------------------------

def _resize(images: torch.Tensor, size: int | None) -> tuple[torch.Tensor, str]:
    """Bilinear, antialiased resize of uint8 [N, C, H, W] to uint8 [N, C, size, size], in chunks.

    Returns the images (unchanged when size is None or already H = W = size)
    and a note for the ``source`` sentence.
    """
    if size is None or images.shape[-2:] == (size, size):
        return images, ""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out, f", resized to {size}x{size}"
