"""Tests of "Explain your own model": models.import_encoder (torchvision-layout ResNets and the usual SSL
checkpoint layouts -> the course's ResNet) and data.datasets.example_photographs (offline photographs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from course_utils.data import datasets
from course_utils.data.datasets import EXAMPLE_PHOTOGRAPHS, example_photographs
from course_utils.models import IMAGENET_MEAN, IMAGENET_STD, IgnoredKeysWarning, ResNet, import_encoder

SIZE = 64  # px: the ImageNet stem reduces it to 2 x 2 at layer4, enough to test the mapping quickly


def random_resnet(arch: str = "resnet50", seed: int = 0) -> torchvision.models.ResNet:
    """A torchvision ResNet in eval mode with random BatchNorm statistics and affine parameters, so that a
    swapped or missing BatchNorm changes the features (fresh BNs are the identity in eval mode)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def torchvision_features(model: torchvision.models.ResNet, x: torch.Tensor,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """The reference: torchvision's ResNet with fc removed, on images normalised with mean/std."""
    body = copy.deepcopy(model)
    body.fc = nn.Identity()
    with torch.no_grad():
        return body((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(x)


def assert_same_features(encoder: nn.Module, model: torchvision.models.ResNet, x: torch.Tensor) -> None:
    torch.testing.assert_close(features(encoder, x), torchvision_features(model, x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tv50() -> torchvision.models.ResNet:
    return random_resnet("resnet50")


@pytest.fixture(scope="module")
def tv18() -> torchvision.models.ResNet:
    return random_resnet("resnet18", seed=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ equality

def test_resnet50_state_dict_gives_torchvision_features_without_fc(tv50, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredKeysWarning)  # fc alone is dropped silently
        encoder = import_encoder(tv50.state_dict())
    assert isinstance(encoder, ResNet) and not encoder.training
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert encoder.out_dim == 2048 and encoder.config["small_input"] is False
    assert encoder.import_info["ignored"] == ["fc.weight", "fc.bias"]
    h = features(encoder, images)
    assert h.shape == (2, 2048) and h.std() > 0.1  # the features vary: the check below is not trivial
    assert_same_features(encoder, tv50, images)


def test_resnet50_from_a_module_and_from_a_file(tv50, images, tmp_path):
    assert_same_features(import_encoder(tv50), tv50, images)
    path = tmp_path / "my_resnet50.pth"
    torch.save(tv50.state_dict(), path)
    assert_same_features(import_encoder(path), tv50, images)
    assert_same_features(import_encoder(str(path)), tv50, images)


def test_mean_and_std_are_the_encoders_normalisation(tv18, images):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    encoder = import_encoder(tv18, arch="resnet18", mean=mean, std=std)
    torch.testing.assert_close(features(encoder, images), torchvision_features(tv18, images, mean, std),
                               rtol=1e-4, atol=1e-4)


def test_resnet34(images):
    model = random_resnet("resnet34", seed=2)
    assert_same_features(import_encoder(model.state_dict(), arch="ResNet-34"), model, images)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "encoder.", "model.", "module.encoder_q.",
                                    "module.base_encoder.", "module.backbone.", "_orig_mod.module."])
def test_usual_prefixes_are_stripped(tv18, images, prefix):
    state = {prefix + k: v for k, v in tv18.state_dict().items() if not k.startswith("fc.")}
    state[prefix.replace("encoder_q", "encoder_k") + "fc.weight"] = torch.zeros(3, 512)  # a head: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        assert_same_features(import_encoder(state, arch="resnet18"), tv18, images)


def test_moco_key_encoder_and_heads_are_ignored_with_one_warning(tv18, images):
    other = random_resnet("resnet18", seed=5)
    state = {f"module.encoder_q.{k}": v for k, v in tv18.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v for k, v in other.state_dict().items()}
    state["module.queue"] = torch.zeros(128, 10)
    with pytest.warns(IgnoredKeysWarning, match=r"module\.encoder_k\.\* \(122\), module\.queue \(1\)") as record:
        encoder = import_encoder({"state_dict": state, "epoch": 200, "arch": "resnet18"}, arch="resnet18")
    assert len(record) == 1
    assert_same_features(encoder, tv18, images)


def test_solo_learn_lightning_checkpoint(tv18, images, tmp_path):
    momentum = random_resnet("resnet18", seed=3)
    state = {f"backbone.{k}": v for k, v in tv18.state_dict().items() if not k.startswith("fc.")}
    state |= {f"momentum_backbone.{k}": v for k, v in momentum.state_dict().items() if not k.startswith("fc.")}
    state |= {"projector.0.weight": torch.randn(8, 512), "projector.0.bias": torch.randn(8),
              "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.randn(10)}
    path = tmp_path / "solo-learn-byol-epoch=99.ckpt"
    torch.save({"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.2.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": []}, path)
    with pytest.warns(IgnoredKeysWarning, match="momentum_backbone") as record:
        encoder = import_encoder(path, arch="resnet18")
    assert "projector" in str(record[0].message) and "classifier" in str(record[0].message)
    assert encoder.import_info["nesting"] == ["state_dict"]
    assert_same_features(encoder, tv18, images)


class LightlySimCLR(nn.Module):
    """lightly's example model: the torchvision ResNet's children without fc, and a projection head."""

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 8))


def test_lightly_sequential_backbone(tv18, images, tmp_path):
    model = LightlySimCLR(tv18)
    assert "backbone.4.0.conv1.weight" in model.state_dict()
    path = tmp_path / "lightly.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.warns(IgnoredKeysWarning, match="projection_head"):
        encoder = import_encoder(path, arch="resnet18")
    assert_same_features(encoder, tv18, images)
    assert_same_features(import_encoder(model.backbone, arch="resnet18"), tv18, images)  # keys "0.weight", ...


def test_dino_checkpoint_uses_the_teacher(tv18, images, tmp_path):
    student = random_resnet("resnet18", seed=4)
    teacher = {f"backbone.{k}": v for k, v in tv18.state_dict().items() if not k.startswith("fc.")}
    teacher |= {"head.mlp.0.weight": torch.randn(8, 512), "head.last_layer.weight_g": torch.ones(16, 1)}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()}, "teacher": teacher,
                "optimizer": {}, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 16)}}, path)
    with pytest.warns(IgnoredKeysWarning, match=r"head\.\* \(2\)"):
        encoder = import_encoder(path, arch="resnet18")
    assert encoder.import_info["nesting"] == ["teacher"]
    assert_same_features(encoder, tv18, images)


def test_explicit_prefix_for_an_unknown_wrapper(tv18, images):
    state = {f"online_network.encoder.{k}": v for k, v in tv18.state_dict().items()}
    state |= {f"target_network.encoder.{k}": torch.zeros_like(v) for k, v in tv18.state_dict().items()}
    with pytest.raises(ValueError, match=r"prefix='online_network\.encoder\.'"):
        import_encoder(state, arch="resnet18")
    with pytest.warns(IgnoredKeysWarning, match="target_network") as record:
        encoder = import_encoder(state, arch="resnet18", prefix="online_network.encoder.")
    assert "online_network" not in str(record[0].message)  # its fc is dropped silently
    assert_same_features(encoder, tv18, images)


def test_half_precision_checkpoint_and_missing_batch_counters_load_as_float32(tv18, images):
    state = {k: v.half() if v.is_floating_point() else v for k, v in tv18.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    encoder = import_encoder(state, arch="resnet18")
    assert all(p.dtype == torch.float32 for p in encoder.state_dict().values() if p.is_floating_point())
    torch.testing.assert_close(features(encoder, images), torchvision_features(tv18, images), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------ errors

def test_wrong_arch_names_the_keys_and_the_arch_they_look_like(tv50, tv18):
    with pytest.raises(ValueError) as error:
        import_encoder(tv50.state_dict(), arch="resnet18")
    message = str(error.value)
    assert "unexpected" in message and "layer1.0.conv3.weight" in message and "arch='resnet50'" in message
    with pytest.raises(ValueError) as error:
        import_encoder(tv18.state_dict(), arch="resnet50")
    message = str(error.value)
    assert "missing" in message and "layer1.0.conv3.weight" in message and "arch='resnet18'" in message
    with pytest.raises(ValueError, match="resnet101"):
        import_encoder(tv18.state_dict(), arch="resnet101")


def test_missing_and_unexpected_keys_are_named_with_counts(tv18):
    state = dict(tv18.state_dict())
    del state["layer4.1.conv2.weight"], state["layer2.0.downsample.1.running_var"]
    state["layer4.2.conv1.weight"] = torch.zeros(512, 512, 3, 3)  # a block ResNet-18 does not have
    with pytest.raises(ValueError) as error:
        import_encoder(state, arch="resnet18")
    message = str(error.value)
    assert "2 encoder keys are missing" in message and "layer4.1.conv2.weight" in message
    assert "layer2.0.downsample.1.running_var" in message
    assert "1 encoder keys are unexpected" in message and "layer4.2.conv1.weight" in message


def test_wrong_shapes_are_named(tv18):
    state = dict(tv18.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a CIFAR-style 3x3 stem
    with pytest.raises(ValueError, match=r"conv1\.weight: \(64, 3, 3, 3\) in the file, \(64, 3, 7, 7\) expected"):
        import_encoder(state, arch="resnet18")


def test_no_encoder_keys_lists_what_was_found():
    with pytest.raises(ValueError, match=r"missing.*Keys found: 2 \(first: head\.weight, head\.bias\)"):
        import_encoder({"head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, arch="resnet18")


def test_two_encoders_mapping_to_the_same_keys_are_refused(tv18):
    state = {f"backbone.{k}": v for k, v in tv18.state_dict().items()}
    state |= {f"encoder.{k}": v for k, v in tv18.state_dict().items()}
    with pytest.raises(ValueError, match=r"'backbone\.conv1\.weight' and 'encoder\.conv1\.weight'.*prefix="):
        import_encoder(state, arch="resnet18")


def test_bad_files_and_sources(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="could not read encoder checkpoint.*weights_only"):
        import_encoder(garbage)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        import_encoder(tensor_file)
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "weights": {"a": {"b": 1}}}, nested)
    with pytest.raises(ValueError, match=r"holds no state dict.*\['epoch', 'weights'\]"):
        import_encoder(nested)
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        import_encoder(tmp_path / "no_such_file.pth")
    with pytest.raises(TypeError, match="state dict, a checkpoint path or an nn.Module"):
        import_encoder(42)
    with pytest.raises(ValueError, match="unsupported arch 'vit_b_16'"):
        import_encoder({}, arch="vit_b_16")


# ------------------------------------------------------------------------------------------------ explainers

@pytest.mark.timeout(60)
def test_explainers_run_on_an_imported_resnet50(tv50):
    """Grad-CAM with an SSL target, RELAX with a few masks and Q-Score on the ImageNet-stem Bottleneck ResNet."""
    from course_utils.explain.gradcam import cosine_to, gradcam, squared_norm
    from course_utils.explain.qscore import qscore
    from course_utils.explain.relax import relax

    encoder = import_encoder(tv50)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = encoder(x)
    for target in (cosine_to(h[1]), squared_norm()):
        cam = gradcam(encoder, encoder.layer4, x[:1], target)
        assert cam.shape == (1, SIZE, SIZE) and torch.isfinite(cam).all() and cam.max() > 0
    result = relax(encoder, x[0], num_masks=8, batch_size=8, generator=torch.Generator().manual_seed(0))
    for map_ in (result.importance, result.uncertainty, result.u_relax):
        assert map_.shape == (SIZE, SIZE) and torch.isfinite(map_).all()
    q = qscore(h).q
    assert q.shape == (2,) and torch.isfinite(q).all()


# ------------------------------------------------------------------------------------------------ photographs

def test_example_photographs_are_real_colour_images_in_unit_range():
    images, names = example_photographs(size=48)
    assert names == list(EXAMPLE_PHOTOGRAPHS) == ["astronaut", "cat", "coffee", "rocket"]
    assert images.shape == (4, 3, 48, 48) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert (images.std((2, 3)) > 0.05).all()  # photographs, not blank
    assert (images[:, 0] - images[:, 2]).abs().mean() > 0.02  # colour, not grey repeated
    cat, cat_names = example_photographs(size=32, names=["cat"])
    assert cat.shape == (1, 3, 32, 32) and cat_names == ["cat"]


def test_example_photographs_default_size_is_imagenet():
    images, _ = example_photographs(names=["coffee"])
    assert images.shape == (1, 3, 224, 224)


def test_example_photographs_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown photograph names \\['dog'\\]"):
        example_photographs(names=["dog"])
    with pytest.raises(ValueError, match="size must be a positive int"):
        example_photographs(size=0)
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        example_photographs()
