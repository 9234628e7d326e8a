"""ProtoPNet head (SCIENCE.md §11): formulas against independent computations, the push, the stages."""

import math

import numpy as np
import pytest
import torch

from course_utils.explain.protopnet import (
    ProtoPNet, cluster_cost, encoder_features, evidence_maps, log_similarity, off_class_l1, patch_distances, protopnet_loss,
    push_prototypes, separation_cost, stage_features, top_prototypes, train_protopnet,
)
from course_utils.models import resnet


@pytest.fixture(scope="module")
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by a patch's content, wherever it is: a red or a blue square on noise."""
    generator = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(48, 3, 16, 16, generator=generator)
    labels = torch.arange(48) % 2
    for i in range(48):
        top, left = torch.randint(0, 10, (2,), generator=generator).tolist()
        images[i, 0 if labels[i] == 0 else 2, top:top + 6, left:left + 6] = 0.9
    return images, labels


def small_model(**options) -> ProtoPNet:
    torch.manual_seed(0)
    return ProtoPNet(resnet(10, 8), num_classes=2, **{"layer": "layer2", "prototypes_per_class": 3,
                                                      "prototype_dim": 6, **options})


def test_log_similarity_matches_the_formula_elementwise():
    distances = torch.tensor([0.0, 1e-6, 0.5, 1.0, 3.0, 250.0])
    expected = [math.log((d + 1) / (d + 1e-4)) for d in distances.tolist()]
    assert np.allclose(log_similarity(distances).numpy(), expected, rtol=1e-6)
    assert log_similarity(torch.zeros(1), eps=0.01).item() == pytest.approx(math.log(100))
    assert (log_similarity(distances).diff() < 0).all()  # closer means more similar


def test_patch_distances_equal_a_loop_over_patches():
    generator = torch.Generator().manual_seed(1)
    features, prototypes = torch.rand(2, 5, 3, 4, generator=generator), torch.rand(7, 5, generator=generator)
    brute = torch.empty(2, 7, 3, 4)
    for b in range(2):
        for p in range(7):
            for i in range(3):
                for j in range(4):
                    brute[b, p, i, j] = sum((features[b, d, i, j] - prototypes[p, d]) ** 2 for d in range(5))
    assert torch.allclose(patch_distances(features, prototypes), brute, atol=1e-6)


def test_cluster_and_separation_costs_on_a_hand_computed_case():
    min_distances = torch.tensor([[1.0, 5.0, 2.0, 7.0], [3.0, 0.5, 4.0, 1.0]])
    prototype_class, labels = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])
    # image 0 (class 0): own min(1, 5) = 1, other min(2, 7) = 2; image 1 (class 1): own min(4, 1) = 1,
    # other min(3, 0.5) = 0.5
    assert cluster_cost(min_distances, labels, prototype_class).item() == pytest.approx(1.0)
    assert separation_cost(min_distances, labels, prototype_class).item() == pytest.approx(-1.25)


def test_off_class_l1_sums_only_the_weights_to_other_classes():
    weight = torch.tensor([[1.0, 2.0, -3.0, 4.0], [5.0, -6.0, 7.0, 8.0]])
    assert off_class_l1(weight, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(3 + 4 + 5 + 6)


def test_the_loss_adds_the_weighted_terms_to_cross_entropy(tiny_data):
    model = small_model()
    images, labels = tiny_data
    output = model.explain(images[:8])
    expected = (torch.nn.functional.cross_entropy(output.logits, labels[:8])
                + 0.8 * cluster_cost(output.min_distances, labels[:8], model.prototype_class)
                + 0.08 * separation_cost(output.min_distances, labels[:8], model.prototype_class))
    assert torch.allclose(protopnet_loss(output, labels[:8], model.prototype_class), expected)


def test_the_head_computes_logits_from_the_closest_patch(tiny_data):
    model = small_model().eval()
    images = tiny_data[0][:4]
    output = model.explain(images)
    assert output.distances.shape == (4, 6, 8, 8) and output.logits.shape == (4, 2)
    assert torch.equal(output.min_distances, output.distances.flatten(2).min(2).values)
    weight = torch.tensor([[1.0] * 3 + [-0.5] * 3, [-0.5] * 3 + [1.0] * 3])  # the paper's initialisation
    assert torch.equal(model.last_layer.weight, weight)
    expected = torch.log((output.min_distances + 1) / (output.min_distances + 1e-4)) @ weight.T
    assert torch.allclose(output.logits, expected, atol=1e-5)
    assert model.similarity_maps(images).shape == (4, 6, 16, 16)


def test_after_push_every_prototype_is_its_own_class_training_patch_and_the_nearest(tiny_data):
    images, labels = tiny_data
    model = small_model().eval()
    features = encoder_features(model, images)
    before = model.prototypes.detach().clone()
    with torch.no_grad():
        patches = model.add_on(features)  # [N, D, h, w]
        distances = patch_distances(patches, before)  # [N, P, h, w]
    record = push_prototypes(model, features, labels, batch_size=5)  # several batches: the running minimum
    for j in range(model.prototypes.shape[0]):
        i, r, c = record.image_index[j], record.row[j], record.col[j]
        assert labels[i] == model.prototype_class[j]
        assert torch.allclose(model.prototypes[j], patches[i, :, r, c], atol=1e-6)
        own = labels == model.prototype_class[j]
        assert distances[i, j, r, c] == pytest.approx(distances[own, j].min().item(), abs=1e-6)
        assert record.moved[j] == pytest.approx(distances[i, j, r, c].item(), rel=1e-4, abs=1e-6)
    with torch.no_grad():  # each prototype now sits at distance 0 from its source patch
        assert model.head(features[record.image_index]).min_distances.diagonal().max() < 1e-5


def test_training_with_a_frozen_encoder_learns_and_leaves_the_encoder_untouched(tiny_data):
    images, labels = tiny_data
    model = small_model()
    encoder_state = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    history = train_protopnet(model, images, labels, warm_epochs=15, last_layer_epochs=30, batch_size=16,
                              lr=1e-2, progress=False)
    assert history.stage.count("warm-up") == 15 and history.stage.count("last layer") == 30
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in encoder_state.items())
    assert history.accuracy[-1] == 1.0
    model.eval()
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() == 1.0


def test_the_l1_term_shrinks_the_off_class_weights_of_the_last_layer(tiny_data):
    images, labels = tiny_data
    off_class = []
    for lambda_l1 in (0.0, 0.5):
        model = small_model()
        train_protopnet(model, images, labels, warm_epochs=2, last_layer_epochs=20, batch_size=16, lr=1e-2,
                        lambda_l1=lambda_l1, progress=False)
        off_class.append(off_class_l1(model.last_layer.weight, model.prototype_class).item())
    assert off_class[1] < 0.8 * off_class[0]


def test_joint_training_fine_tunes_the_encoder(tiny_data):
    images, labels = tiny_data
    model = small_model()
    before = model.trunk[0][0].weight.clone()
    history = train_protopnet(model, images, labels, warm_epochs=1, joint_epochs=2, last_layer_epochs=1,
                              batch_size=16, progress=False)
    assert history.stage[:3] == ["warm-up", "joint", "joint"] and history.push is not None
    assert not torch.equal(before, model.trunk[0][0].weight)


def test_top_prototypes_rank_evidence_for_the_predicted_class(tiny_data):
    images, labels = tiny_data
    model = small_model()
    train_protopnet(model, images, labels, warm_epochs=5, last_layer_epochs=10, batch_size=16, lr=1e-2,
                    progress=False)
    evidence = top_prototypes(model, images[0], k=4)
    assert evidence.predicted == int(model(images[:1]).argmax())
    assert (evidence.contribution.diff() <= 0).all() and len(evidence.prototype) == 4
    g = log_similarity(model.explain(images[:1]).min_distances[0].detach())
    assert torch.allclose(evidence.contribution, (g * model.last_layer.weight[evidence.predicted])[evidence.prototype])


def test_evidence_maps_are_the_similarity_maps_of_each_images_top_prototype(tiny_data):
    images, labels = tiny_data
    model = small_model()
    train_protopnet(model, images, labels, warm_epochs=3, last_layer_epochs=3, batch_size=16, lr=1e-2,
                    progress=False)
    maps = evidence_maps(model, images[:6], batch_size=4)
    assert maps.shape == (6, *images.shape[-2:])
    for i in range(6):
        top = int(top_prototypes(model, images[i], k=1).prototype[0])
        assert torch.allclose(maps[i], model.similarity_maps(images[i:i + 1])[0, top], atol=1e-3)  # batch rounding


def test_bad_input_raises_clear_errors(tiny_data):
    images, labels = tiny_data
    encoder = resnet(10, 8)
    with pytest.raises(ValueError, match="layer must be one of"):
        ProtoPNet(encoder, 2, layer="fc")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ProtoPNet(encoder, 1)
    with pytest.raises(ValueError, match="prototypes_per_class"):
        ProtoPNet(encoder, 2, prototypes_per_class=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        log_similarity(torch.ones(2), eps=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        log_similarity(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="NaN"):
        log_similarity(torch.tensor([float("nan")]))
    model = small_model()
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        train_protopnet(model, images, labels + 1, warm_epochs=0, last_layer_epochs=0, progress=False)
    with pytest.raises(ValueError, match="integer class indices"):
        train_protopnet(model, images, labels.float(), progress=False)
    with pytest.raises(ValueError, match="one class per image"):
        train_protopnet(model, images, labels[:3], progress=False)
    with pytest.raises(ValueError, match="0–255"):
        model(images * 255)
    with pytest.raises(ValueError, match=r"none of class\(es\) \[1\]"):
        push_prototypes(model, encoder_features(model, images[labels == 0]), labels[labels == 0])
    with pytest.raises(ValueError, match="k must be"):
        top_prototypes(model, images[0], k=0)


def test_precomputed_features_give_the_same_head_as_images(tiny_data):
    images, labels = tiny_data
    trained = []
    for precomputed in (False, True):
        model = small_model()
        features = encoder_features(model, images) if precomputed else None
        train_protopnet(model, images, labels, warm_epochs=2, last_layer_epochs=2, batch_size=16, progress=False,
                        features=features)
        trained.append(model)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(trained[0].state_dict().values(),
                                                                 trained[1].state_dict().values()))
    with pytest.raises(ValueError, match=r"layer2 maps of the images"):
        train_protopnet(small_model(), images, labels, features=torch.zeros(3, 8, 8, 8), progress=False)
    with pytest.raises(ValueError, match="joint_epochs"):
        train_protopnet(small_model(), images, labels, joint_epochs=1, features=encoder_features(small_model(), images),
                        progress=False)


def test_stage_features_equal_each_heads_own_features(tiny_data):
    images = tiny_data[0][:6]
    encoder = resnet(10, 8)
    stages = stage_features(encoder, images, ["layer2", "layer4"], batch_size=4)
    for layer in ("layer2", "layer4"):
        head = ProtoPNet(encoder, 2, layer=layer)
        assert torch.allclose(stages[layer], encoder_features(head, images), atol=1e-6)
    with pytest.raises(ValueError, match="subset of"):
        stage_features(encoder, images, ["fc"])
