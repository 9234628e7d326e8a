"""Tests of course_utils.data.datasets on tiny fake files in each real format."""

from __future__ import annotations

import gzip
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from course_utils.data import datasets
from course_utils.data.datasets import (
    FASHION_MNIST_CLASSES,
    ImageTensorDataset,
    default_data_root,
    load_dataset,
)
from course_utils.data.shapes import ShapesWorld

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Every test sees an empty COURSE_DATA_ROOT and no Debian Fashion-MNIST folder (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("isolated_data_root")


# --------------------------------------------------------------------------
# Fake file writers
# --------------------------------------------------------------------------

def fake_fashion_arrays(n: int, rows: int = 4, cols: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, rows, cols), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """Write an idx file of unsigned bytes; the magic number encodes the number of dims."""
    magic = 0x0800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path = path.with_name(path.name + ".gz") if gz else path
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def write_fashion(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)


def write_cifar(root: Path, per_batch: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Fake cifar-10-batches-py with pickles like the official ones (bytes keys); returns their contents."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    contents = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        contents[name] = (data, labels)
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": per_batch}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return contents


def write_stl(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Fake stl10_binary; images are returned as [N, 3, H, W] (rows first), the files hold [N, 3, W, H]."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    contents = {}
    for split, n in counts.items():
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # column-major, as in the real files
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, n, dtype=np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
        contents[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return contents


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def left_red_right_blue(height: int, width: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2:, 2] = 255
    return image


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_idx_files_round_trip_pixels_and_labels(tmp_path, gz, layout):
    images, labels = fake_fashion_arrays(7)
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    write_fashion(folder, "test", images, labels, gz=gz)

    ds = load_dataset("fashion-mnist", split="test", root=tmp_path)

    assert isinstance(ds, ImageTensorDataset)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7, 3, 4, 5)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    for channel in range(3):  # grey repeated to 3 channels
        assert np.array_equal(ds.images[:, channel].numpy(), images)
    assert int(ds.images[2, 1, 3, 4]) == images[2, 3, 4]
    assert ds.classes == list(FASHION_MNIST_CLASSES)
    assert ds.name == "fashion-mnist" and ds.split == "test"
    assert str(folder) in ds.source and ("gzipped" in ds.source) == gz


def test_fashion_mnist_item_is_float_in_unit_range_with_int_label(tmp_path):
    images, labels = fake_fashion_arrays(3)
    images[1, 0, 0], images[1, 0, 1] = 0, 255
    write_fashion(tmp_path, "train", images, labels)

    image, label = load_dataset("fashion-mnist", root=tmp_path)[1]

    assert image.dtype == torch.float32 and image.shape == (3, 4, 5)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[0, 0, 0] == 0.0 and image[2, 0, 1] == 1.0
    assert isinstance(label, int) and label == labels[1]


def test_fashion_mnist_size_option_resizes_to_square(tmp_path):
    images = np.full((2, 28, 28), 200, np.uint8)
    write_fashion(tmp_path, "train", images, np.array([0, 9], np.uint8))

    ds = load_dataset("fashion-mnist", root=tmp_path, size=32)

    assert ds.images.shape == (2, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert (ds.images == 200).all()  # a constant image stays constant
    assert "32x32" in ds.source


def test_fashion_mnist_is_found_under_course_data_root(isolated_data_root):
    images, labels = fake_fashion_arrays(2)
    write_fashion(isolated_data_root / "fashion-mnist", "train", images, labels, gz=True)

    ds = load_dataset("fashion-mnist")

    assert len(ds) == 2 and str(isolated_data_root / "fashion-mnist") in ds.source


def test_fashion_mnist_falls_back_to_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    images, labels = fake_fashion_arrays(4)
    write_fashion(debian, "train", images, labels, gz=True)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)

    assert np.array_equal(load_dataset("fashion-mnist").images[:, 0].numpy(), images)


def test_idx_bad_magic_number_raises_value_error_naming_file(tmp_path):
    images, labels = fake_fashion_arrays(3)
    write_fashion(tmp_path, "train", images, labels)
    bad = write_idx(tmp_path / "train-images-idx3-ubyte", images, magic=2049)

    with pytest.raises(ValueError, match="magic number 2049") as info:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_idx_truncated_file_raises_value_error(tmp_path, gz):
    images, labels = fake_fashion_arrays(3)
    write_fashion(tmp_path, "train", images, labels, gz=gz)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images[:2], gz=gz)
    header = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    header[4:8] = (3).to_bytes(4, "big")  # header announces 3 images, the data holds 2
    path.write_bytes(gzip.compress(bytes(header)) if gz else bytes(header))

    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_idx_image_label_count_mismatch_raises_value_error(tmp_path):
    images, labels = fake_fashion_arrays(3)
    write_fashion(tmp_path, "train", images, labels[:2])

    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_real_fashion_mnist_from_debian_package(monkeypatch):
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip(f"{debian} does not exist (install the Debian package dataset-fashion-mnist)")
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)

    train = load_dataset("fashion-mnist", split="train")
    test = load_dataset("fashion-mnist", split="test")

    assert train.images.shape == (60000, 3, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 3, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert 0 <= int(test.labels.min()) and int(test.labels.max()) == 9
    assert torch.equal(train.images[:100, 0], train.images[:100, 2])
    assert str(debian) in train.source


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------

def test_cifar10_pickles_round_trip_with_rgb_channel_order(tmp_path):
    contents = write_cifar(tmp_path, per_batch=3)

    train = load_dataset("cifar10", split="train", root=tmp_path)
    test = load_dataset("cifar10", split="test", root=tmp_path)

    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 3, 32, 32)
    expected_labels = sum((contents[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels and train.labels.dtype == torch.int64
    assert train.classes == CIFAR_CLASSES and test.classes == CIFAR_CLASSES
    # Row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major (y * 32 + x).
    data = contents["test_batch"][0]
    y, x = 2, 5
    for channel in range(3):
        assert int(test.images[1, channel, y, x]) == data[1, channel * 1024 + y * 32 + x]
    # The 4th training image is the first of data_batch_2.
    assert int(train.images[3, 2, 31, 0]) == contents["data_batch_2"][0][0, 2 * 1024 + 31 * 32 + 0]


def test_cifar10_size_option_resizes(tmp_path):
    write_cifar(tmp_path, per_batch=2)

    assert load_dataset("cifar10", split="test", root=tmp_path, size=16).images.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------
# STL-10
# --------------------------------------------------------------------------

def test_stl10_binaries_are_transposed_from_column_major(tmp_path):
    contents = write_stl(tmp_path, {"train": 2, "test": 3})
    raw = np.fromfile(tmp_path / "stl10_binary" / "train_X.bin", np.uint8)

    ds = load_dataset("stl10", split="train", root=tmp_path)

    images, labels = contents["train"]
    assert ds.images.shape == (2, 3, 96, 96) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), images)
    # Byte c*96*96 + x*96 + y of an image is the pixel in row y, column x.
    c, y, x = 1, 3, 70
    assert int(ds.images[1, c, y, x]) == raw[3 * 96 * 96 + c * 96 * 96 + x * 96 + y]
    assert ds.labels.tolist() == (labels.astype(np.int64) - 1).tolist()
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert len(load_dataset("stl10", split="test", root=tmp_path)) == 3


def test_stl10_unlabeled_split_has_labels_minus_one(tmp_path):
    write_stl(tmp_path, {"unlabeled": 3})

    ds = load_dataset("stl10", split="unlabeled", root=tmp_path)

    assert ds.images.shape == (3, 3, 96, 96)
    assert ds.labels.tolist() == [-1, -1, -1]
    assert ds[0][1] == -1


def test_stl10_file_size_not_multiple_of_image_size_raises_value_error(tmp_path):
    write_stl(tmp_path, {"train": 1})
    with open(tmp_path / "stl10_binary" / "train_X.bin", "ab") as f:
        f.write(b"\x00" * 10)

    with pytest.raises(ValueError, match="multiple of 3\\*96\\*96"):
        load_dataset("stl10", root=tmp_path)


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------

def test_folder_of_pngs_is_resized_centre_cropped_and_labelled_by_folder(tmp_path):
    write_png(tmp_path / "dog" / "a.png", left_red_right_blue(20, 40))  # wide
    write_png(tmp_path / "cat" / "b.png", np.full((50, 30, 3), 90, np.uint8))  # tall
    write_png(tmp_path / "cat" / "c.png", np.full((16, 16), 30, np.uint8))  # grey -> RGB
    (tmp_path / "cat" / "notes.txt").write_text("not an image")

    ds = load_dataset("folder", root=tmp_path, size=16)

    assert ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert (ds.images[0] == 90).all() and (ds.images[1] == 30).all()
    # 40x20 -> 32x16 -> centre 16x16: the left half of the crop is red, the right half blue.
    assert ds.images[2, :, 8, 2].tolist() == [255, 0, 0]
    assert ds.images[2, :, 8, 13].tolist() == [0, 0, 255]
    assert str(tmp_path) in ds.source


def test_folder_default_size_is_64(tmp_path):
    write_png(tmp_path / "a" / "x.png", np.zeros((100, 80, 3), np.uint8))

    assert load_dataset("folder", root=tmp_path).images.shape == (1, 3, 64, 64)


def test_folder_uses_split_subfolder_when_it_exists(tmp_path):
    write_png(tmp_path / "train" / "a" / "x.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "test" / "b" / "y.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "test" / "c" / "z.png", np.zeros((8, 8, 3), np.uint8))

    assert load_dataset("folder", split="train", root=tmp_path, size=8).classes == ["a"]
    assert load_dataset("folder", split="test", root=tmp_path, size=8).classes == ["b", "c"]


def test_folder_with_other_split_folders_only_raises_file_not_found(tmp_path):
    write_png(tmp_path / "train" / "a" / "x.png", np.zeros((8, 8, 3), np.uint8))

    with pytest.raises(FileNotFoundError, match="no 'test' folder"):
        load_dataset("folder", split="test", root=tmp_path)


def test_folder_without_images_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="class_name"):
        load_dataset("folder", root=tmp_path)


def test_folder_without_root_raises_value_error():
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")


# --------------------------------------------------------------------------
# Missing data, bad arguments, downloads
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "stl10"])
def test_missing_data_raises_file_not_found_listing_folders_and_download(isolated_data_root, name):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name)
    message = str(info.value)
    assert str(isolated_data_root) in message
    assert "download" in message and "COURSE_DATA_ROOT" in message


def test_missing_fashion_mnist_message_names_debian_package_and_every_folder(isolated_data_root):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    for folder in [isolated_data_root, isolated_data_root / "FashionMNIST" / "raw",
                   isolated_data_root / "fashion-mnist", datasets.DEBIAN_FASHION_MNIST]:
        assert f"  {folder}  (" in message


def test_missing_data_in_explicit_root_names_that_root(tmp_path):
    root = tmp_path / "my_data"
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
        load_dataset("cifar10", root=root)
    assert str(root / "cifar-10-batches-py") in str(info.value)


def test_unknown_name_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in ["shapes", "shapes-spurious", "fashion-mnist", "cifar10", "stl10", "folder"]:
        assert name in str(info.value)


@pytest.mark.parametrize("name, split", [("fashion-mnist", "val"), ("stl10", "validation"), ("shapes", "unlabeled")])
def test_unknown_split_raises_value_error_listing_valid_splits(name, split):
    with pytest.raises(ValueError, match="choose one of: train, test"):
        load_dataset(name, split=split)


def test_unknown_option_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="seed"):
        load_dataset("cifar10", root=tmp_path, seed=3)


def test_download_fetches_with_torchvision_then_parses_torchvision_layout(tmp_path, monkeypatch):
    images, labels = fake_fashion_arrays(5)
    calls = []

    def fake_fashion_mnist(root, train, download):
        calls.append((root, download))
        write_fashion(Path(root) / "FashionMNIST" / "raw", "train", images, labels, gz=True)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", fake_fashion_mnist)

    ds = load_dataset("fashion-mnist", root=tmp_path / "dl", download=True)

    assert calls == [(str(tmp_path / "dl"), True)]
    assert np.array_equal(ds.images[:, 1].numpy(), images)
    load_dataset("fashion-mnist", root=tmp_path / "dl", download=True)
    assert len(calls) == 1  # files already there: no second download


def test_download_without_internet_raises_runtime_error_saying_so(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)

    with pytest.raises(RuntimeError, match="no internet access") as info:
        load_dataset("cifar10", root=tmp_path, download=True)
    assert "cifar-10-python.tar.gz" in str(info.value)


def test_default_data_root_honours_env_var_else_repo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("COURSE_DATA_ROOT")
    repo = Path(datasets.__file__).resolve().parents[2]
    assert default_data_root() == repo / "data" / "cache"
    assert (repo / "course_utils").is_dir()


# --------------------------------------------------------------------------
# ShapesWorld and the dataset class
# --------------------------------------------------------------------------

def test_shapes_returns_shapes_world_without_spurious_correlation():
    ds = load_dataset("shapes", split="val", n=64)

    assert isinstance(ds, ShapesWorld)
    assert len(ds) == 64 and ds.split == "val" and ds.spurious == 0.0
    assert ds.images.shape == (64, 3, 32, 32) and ds.labels.dtype == torch.int64


def test_shapes_spurious_defaults_to_0_9_and_can_be_overridden():
    assert load_dataset("shapes-spurious", n=64).spurious == 0.9
    assert load_dataset("shapes-spurious", n=64, spurious=0.5).spurious == 0.5


def test_image_tensor_dataset_rejects_non_rgb_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                           ["a"], "x", "train", "test data")
    with pytest.raises(ValueError, match="labels"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]),
                           ["a", "b"], "x", "train", "test data")


def test_image_tensor_dataset_repr_is_short():
    ds = ImageTensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]),
                            ["a", "b"], "x", "train", "test data")
    assert repr(ds) == "ImageTensorDataset(name='x', split='train', n=2, size=4x4, classes=2)"


def test_dataset_status_says_where_each_data_set_was_found(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    status = datasets.dataset_status(tmp_path)
    assert status["shapes"].startswith("built in")
    assert status["cifar10"].startswith("not found") and str(tmp_path) in status["cifar10"]
    assert "download=True" in status["stl10"]
