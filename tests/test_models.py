"""Tests of course_utils.models: encoders, SimCLR model and safe checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from course_utils import models
from course_utils.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    SimCLRModel,
    available_pretrained,
    build_model,
    checkpoint_dir,
    load_checkpoint,
    load_pretrained,
    resnet,
    save_checkpoint,
    write_checksum,
)


class Payload:
    """A custom class: pickling it into a checkpoint must be refused by weights_only loading."""

    def __init__(self) -> None:
        self.value = 1


def small_model(depth: int = 10, width: int = 4) -> SimCLRModel:
    torch.manual_seed(0)
    model = SimCLRModel(resnet(depth, width), proj_dim=16)
    for p in model.parameters():  # non-trivial weights (last BN gammas start at zero)
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("small_input", [True, False])
@pytest.mark.parametrize("depth, expansion", [(10, 1), (18, 1), (34, 1), (50, 4)])
def test_resnet_output_shape_and_out_dim_for_every_depth(depth: int, expansion: int, small_input: bool) -> None:
    encoder = resnet(depth, width=4, small_input=small_input)
    h = encoder(images(batch=2))
    assert encoder.out_dim == 8 * 4 * expansion
    assert h.shape == (2, encoder.out_dim)
    assert encoder.config == {"depth": depth, "width": 4, "small_input": small_input}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert isinstance(getattr(encoder, name), torch.nn.Module)


def test_small_input_stem_keeps_resolution_and_imagenet_stem_downsamples() -> None:
    x = images()
    assert resnet(10, 4, small_input=True).stem(x).shape[-1] == 32
    assert resnet(10, 4, small_input=False).stem(x).shape[-1] == 8


def test_normalisation_is_a_layer_inside_the_model() -> None:
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    x = torch.ones(1, 3, 2, 2)
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected.expand(1, 3, 2, 2))
    encoder = resnet(10, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    state = encoder.state_dict()
    assert state["normalize.mean"].shape == (1, 3, 1, 1) and state["normalize.std"].shape == (1, 3, 1, 1)
    x = images()
    manual = encoder.stem((x - 0.5) / 0.25)
    for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4, encoder.pool):
        manual = stage(manual)
    torch.testing.assert_close(encoder(x), manual)


def test_channels_last_bf16_autocast_agrees_with_fp32() -> None:
    model = small_model(18, 8)
    x = images(batch=4)
    h32, z32 = model(x)
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, z16 = model(x.to(memory_format=torch.channels_last))
    assert h16.shape == h32.shape and z16.shape == z32.shape
    torch.testing.assert_close(h16.float(), h32, rtol=0.1, atol=0.1 * h32.abs().max().item())


def test_simclr_model_returns_representation_and_projection() -> None:
    model = SimCLRModel(resnet(10, 8))
    h, z = model(images(batch=3))
    assert h.shape == (3, 64) and z.shape == (3, 128)
    assert model.config == {"encoder": {"depth": 10, "width": 8, "small_input": True}, "proj_dim": 128}
    assert isinstance(model.projector[1], torch.nn.BatchNorm1d)
    assert build_model(model.config).config == model.config


def test_bad_arguments_raise_helpful_value_errors() -> None:
    with pytest.raises(ValueError, match=r"supported depths: \[10, 18, 34, 50\]"):
        resnet(depth=20)
    with pytest.raises(ValueError, match="width"):
        resnet(width=0)
    with pytest.raises(ValueError, match="proj_dim"):
        SimCLRModel(resnet(10, 4), proj_dim=0)
    with pytest.raises(ValueError, match="encoder"):
        build_model({"proj_dim": 8})


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 32, 32, 3)])
def test_bad_input_shape_raises_value_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"images must be RGB images \[B, 3, H, W\] in \[0, 1\], got \("):
        resnet(10, 4)(torch.rand(shape))


def test_save_load_round_trip_gives_identical_outputs_and_metadata(tmp_path: Path) -> None:
    model, x = small_model(), images()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(model, path, epochs=3, lr=0.5, tags=["a", "b"], extra={"note": None, "ok": True})
    loaded = load_checkpoint(path)
    assert not loaded.training
    for out, ref in zip(loaded(x), model(x)):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    meta = loaded.metadata
    assert meta["epochs"] == 3 and meta["lr"] == 0.5 and meta["tags"] == ["a", "b"]
    assert meta["extra"] == {"note": None, "ok": True}
    assert meta["versions"]["torch"] == torch.__version__
    assert set(meta["versions"]) == {"torch", "torchvision", "python", "course_utils"}
    assert meta["created"].endswith("+00:00")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ssl-xai-course/1" and raw["config"] == model.config
    assert all(v.dtype == torch.float32 for v in raw["state_dict"].values() if v.is_floating_point())


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path, run="old")
    before = path.read_bytes()

    def failing_save(obj: object, f) -> None:
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(small_model(18), path, run="new")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path).metadata["run"] == "old"


def test_checksum_is_written_and_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path)
    write_checksum(path)
    write_checksum(path)  # replacing, not duplicating, the line
    lines = (tmp_path / "SHA256SUMS").read_text().splitlines()
    assert lines == [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  model.pt"]
    load_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"modified or is incomplete.*git checkout -- .*course_utils\.train"):
        load_checkpoint(path)


def test_truncated_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt") as info:
        load_checkpoint(path)
    assert info.value.__cause__ is not None


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_wrong_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="ssl-xai-course/1"):
        load_checkpoint(path)


def test_config_that_does_not_match_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(10), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["encoder"]["depth"] = 18
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"architecture.*'depth': 18.*missing encoder\.layer1\.1\."):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [torch.tensor(1.0), Payload(), {1: "int key"}, [Path("x")]])
def test_non_plain_metadata_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="'bad'"):
        save_checkpoint(small_model(), tmp_path / "model.pt", bad=value)
    assert not list(tmp_path.iterdir())


def test_pickled_custom_objects_are_refused_by_weights_only_loading(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    model = small_model()
    torch.save({"format": "ssl-xai-course/1", "config": model.config, "state_dict": model.state_dict(),
                "metadata": {"payload": Payload()}}, path)
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)


def test_load_pretrained_by_name_and_unknown_name_lists_available(tmp_path: Path) -> None:
    assert available_pretrained(tmp_path) == []
    with pytest.raises(ValueError, match="none are committed yet.*course_utils.train"):
        load_pretrained("simclr", tmp_path)
    model = small_model()
    save_checkpoint(model, tmp_path / "simclr_r10.pt", epochs=1)
    write_checksum(tmp_path / "simclr_r10.pt")
    assert available_pretrained(tmp_path) == ["simclr_r10"]
    with pytest.raises(ValueError, match="available: simclr_r10"):
        load_pretrained("simclr_r18", tmp_path)
    loaded = load_pretrained("simclr_r10", tmp_path)
    torch.testing.assert_close(loaded(images())[1], model(images())[1], rtol=0, atol=0)
    (tmp_path / "simclr_r10.pt").unlink()
    with pytest.raises(FileNotFoundError, match="simclr_r10.pt"):
        load_pretrained("simclr_r10", tmp_path)


def test_every_committed_checkpoint_loads_offline_with_its_command() -> None:
    assert checkpoint_dir() == Path(models.__file__).resolve().parents[1] / "data" / "checkpoints"
    names = available_pretrained()
    assert {"simclr-shapes-r10", "simclr-shapes-r10-nocolor"} <= set(names)
    for name in names:
        model = load_pretrained(name)
        assert model.metadata["command"].startswith("python -m course_utils.train --preset")
        assert (checkpoint_dir() / f"{name}.pt").stat().st_size <= 10_000_000
        h, z = model(torch.rand(2, 3, 32, 32))
        assert torch.isfinite(h).all() and h.shape[1] == model.encoder.out_dim
