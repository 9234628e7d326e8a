"""Safe readers: data files and checkpoints that are crafted, truncated or tampered with raise clear errors.

Issue 19, item 3: the CIFAR-10 reader unpickles only the structure of the real files; idx headers are
checked before memory is allocated; STL-10's class_names.txt must be short text; checkpoints are read
once, verified, and say when they cannot be verified.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shlex
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from course_utils.data import datasets
from course_utils.data.datasets import load_dataset
from course_utils.models import (
    SimCLRModel,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    resnet,
    save_checkpoint,
    write_checksum,
)
from course_utils.vlm import ToyCLIP, Vocabulary, load_toy_clip, save_toy_clip

pytestmark = pytest.mark.usefixtures("isolated_data_root")

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------
# CIFAR-10 pickles
# --------------------------------------------------------------------------

class _Python2Pickler(pickle._Pickler):
    """Writes bytes with Python 2's str opcodes, as in the official CIFAR-10 files (Python 3 would use
    ``_codecs.encode`` at protocol 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes


def python2_style_pickle(obj: object) -> bytes:
    """Protocol 2, bytes as str opcodes, numpy's ``_reconstruct`` spelled ``numpy.core.multiarray``."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(n: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": [int(x) for x in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def write_cifar_test_split(root: Path, batch: object, dump=lambda obj: pickle.dumps(obj, protocol=2)) -> Path:
    """<root>/cifar-10-batches-py/{test_batch, batches.meta}; returns the test_batch path."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_batch").write_bytes(dump(batch))
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": 3, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(dump(meta))
    return folder / "test_batch"


class _OpensAFile:
    """Unpickling this calls ``open(marker, "w")``: a crafted file that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _RunsAShellCommand:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("payload", [_OpensAFile, _RunsAShellCommand], ids=["open", "os.system"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_crafted_cifar_batch_is_refused_without_running_its_code(tmp_path, payload, protocol):
    marker = tmp_path / "marker"
    batch = {**cifar_batch(), b"batch_label": payload(marker)}
    path = write_cifar_test_split(tmp_path / "data", batch, dump=lambda obj: pickle.dumps(obj, protocol=protocol))

    with pytest.raises(ValueError, match="not a plain CIFAR-10 pickle") as info:
        load_dataset("cifar10", split="test", root=tmp_path / "data")

    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message
    forbidden = "open" if payload is _OpensAFile else "system"
    assert f".{forbidden}" in message  # the forbidden global, e.g. "io.open" or "posix.system"


def test_cifar_batch_holding_an_object_array_is_refused(tmp_path):
    batch = {**cifar_batch(), b"filenames": np.array([b"img0.png", 1, None], dtype=object)}
    write_cifar_test_split(tmp_path, batch)

    with pytest.raises(ValueError, match="object array"):
        load_dataset("cifar10", split="test", root=tmp_path)


@pytest.mark.parametrize("dump", [
    python2_style_pickle,
    lambda obj: pickle.dumps(obj, protocol=2),
    lambda obj: pickle.dumps(obj, protocol=4),
], ids=["python2-numpy.core", "python3-protocol2", "protocol4"])
def test_cifar_batch_with_the_real_structure_still_loads(tmp_path, dump):
    batch = cifar_batch(n=3, seed=1)
    write_cifar_test_split(tmp_path, batch, dump=dump)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no DeprecationWarning for numpy.core
        ds = load_dataset("cifar10", split="test", root=tmp_path)

    assert ds.classes == CIFAR_CLASSES
    assert ds.labels.tolist() == batch[b"labels"]
    assert np.array_equal(ds.images.numpy().reshape(3, 3072), batch[b"data"])


def test_python2_style_pickle_uses_the_opcodes_of_the_official_files():
    data = python2_style_pickle(cifar_batch())
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"_codecs" not in data


# --------------------------------------------------------------------------
# Fashion-MNIST idx files
# --------------------------------------------------------------------------

def write_idx_header(path: Path, dims: tuple[int, ...], data: bytes, gz: bool = False) -> Path:
    header = (0x0800 | len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    content = header + data
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


@pytest.fixture
def no_big_allocations(monkeypatch):
    """np.empty of more than 16 MB fails the test (instead of allocating)."""
    real_empty = np.empty

    def guarded(shape, *args, **kwargs):
        count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
        if count > 1 << 24:
            raise AssertionError(f"the reader allocated {count} bytes for a header it should have refused")
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(datasets.np, "empty", guarded)


@pytest.mark.parametrize("dims, gz", [
    ((2**20, 2**10, 2**10), False),  # 1 TiB: above the sane bound
    ((2**32 - 1, 2**32 - 1, 2**32 - 1), False),  # more than numpy can address
    ((100_000, 1000, 1), False),  # 100 MB announced, 8 data bytes present
    ((100_000, 1000, 1), True),  # the same gzipped: more than the compressed file can expand to
], ids=["above-bound", "unaddressable", "larger-than-file", "larger-than-gzip-can-hold"])
def test_idx_with_huge_header_dims_raises_before_allocating(tmp_path, no_big_allocations, dims, gz):
    labels = write_idx_header(tmp_path / "train-labels-idx1-ubyte", (2,), bytes(2))
    images = write_idx_header(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")), dims, bytes(8), gz)
    assert labels.is_file()

    with pytest.raises(ValueError, match=r"header|truncated") as info:
        load_dataset("fashion-mnist", root=tmp_path)

    message = str(info.value)
    assert str(images) in message and "dataset-fashion-mnist" in message and "download" in message


@pytest.mark.parametrize("cut", ["in-header", "in-data"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_truncated_idx_raises_value_error_saying_how_to_replace_it(tmp_path, cut, gz):
    suffix = ".gz" if gz else ""
    write_idx_header(tmp_path / f"train-labels-idx1-ubyte{suffix}", (3,), bytes(3), gz)
    full = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 4, 5)) + bytes(60)
    content = full[:10] if cut == "in-header" else full[:-7]
    images = tmp_path / f"train-images-idx3-ubyte{suffix}"
    images.write_bytes(gzip.compress(content) if gz else content)

    with pytest.raises(ValueError, match="truncated") as info:
        load_dataset("fashion-mnist", root=tmp_path)

    assert str(images) in str(info.value) and "dataset-fashion-mnist" in str(info.value)


# --------------------------------------------------------------------------
# STL-10 class names
# --------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    bytes(range(256)) * 4,  # binary, not UTF-8
    b"airplane\x00\x01\x02\nbird\n",  # valid UTF-8 but control characters
    b"a\n" * 50_000,  # absurdly long
    b"\n \n",  # no names
], ids=["not-utf8", "control-characters", "huge", "empty"])
def test_binary_or_absurd_stl_class_names_raise_value_error_naming_the_file(tmp_path, content):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    np.zeros((1, 3, 96, 96), np.uint8).tofile(folder / "unlabeled_X.bin")
    (folder / "class_names.txt").write_bytes(content)

    with pytest.raises(ValueError) as info:
        load_dataset("stl10", split="unlabeled", root=tmp_path)

    assert str(folder / "class_names.txt") in str(info.value) and "stl10_binary.tar.gz" in str(info.value)


def test_stl_class_names_text_file_still_loads(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    np.zeros((1, 3, 96, 96), np.uint8).tofile(folder / "unlabeled_X.bin")
    (folder / "class_names.txt").write_bytes("airplane\r\nbird\n  car  \n\n".encode())

    assert load_dataset("stl10", split="unlabeled", root=tmp_path).classes == ["airplane", "bird", "car"]


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def small_model(seed: int = 0) -> SimCLRModel:
    torch.manual_seed(seed)
    return SimCLRModel(resnet(10, 4), proj_dim=8)


def tiny_clip() -> ToyCLIP:
    torch.manual_seed(0)
    return ToyCLIP(Vocabulary(["a", "red", "star"]), dim=8, width=4, text_dim=8, text_layers=1, max_length=8)


def test_unregistered_checkpoint_loads_with_a_warning_that_it_is_unverified(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path, run="mine")

    with pytest.warns(UnverifiedCheckpointWarning, match=r"not registered in .*SHA256SUMS.*not verified"):
        model = load_checkpoint(path)
    assert model.metadata["run"] == "mine"

    with pytest.raises(ValueError, match="not registered.*unregistered='error'"):
        load_checkpoint(path, unregistered="error")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(path, unregistered="allow").metadata["run"] == "mine"

    with pytest.raises(ValueError, match="unregistered must be one of"):
        load_checkpoint(path, unregistered="ignore")


def test_registered_checkpoint_loads_silently_even_with_unregistered_error(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path)
    write_checksum(path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path)
        load_checkpoint(path, unregistered="error")


def test_tampered_registered_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path)
    write_checksum(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    for unregistered in ("warn", "error", "allow"):
        with pytest.raises(ValueError, match="checksum mismatch"):
            load_checkpoint(path, unregistered=unregistered)


def test_checkpoint_swapped_after_its_checksum_was_taken_is_not_what_gets_loaded(tmp_path, monkeypatch):
    """No time-of-check/time-of-use gap: the bytes that were verified are the bytes that are loaded."""
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path, run="verified")
    write_checksum(path)
    other = tmp_path / "other.pt"
    save_checkpoint(small_model(1), other, run="swapped in")
    real_load = torch.load

    def swap_then_load(source, *args, **kwargs):
        path.write_bytes(other.read_bytes())  # an attacker replaces the file between check and load
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", swap_then_load)
    assert load_checkpoint(path).metadata["run"] == "verified"


def test_toy_clip_checkpoints_share_the_verified_loading(tmp_path):
    path = tmp_path / "clip.pt"
    save_toy_clip(tiny_clip(), path, note="mine")

    with pytest.warns(UnverifiedCheckpointWarning, match="not verified"):
        assert load_toy_clip(path).metadata["note"] == "mine"
    with pytest.raises(ValueError, match="not registered"):
        load_toy_clip(path, unregistered="error")

    write_checksum(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_toy_clip(path, unregistered="error").fingerprint == f"toy-clip:{digest}"

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_toy_clip(path)
