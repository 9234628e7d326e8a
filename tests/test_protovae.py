"""ProtoVAE-style interventions: the loss terms against independent formulas, interventions, effects."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from course_utils.explain.protovae import (
    AttributeClassifier, ProtoVAE, RepresentationDecoder, intervene, intervention_effects, kl_to_standard_normal,
    load_factor_model, prototype_cluster_cost, save_factor_model, train_attribute_classifier, train_protovae,
    train_representation_decoder, traversal,
)
from course_utils.models import write_checksum


@pytest.fixture(scope="module")
def coloured_squares() -> tuple[torch.Tensor, torch.Tensor]:
    """64 images 16 px: a square whose colour (red / blue) and side (left / right) are the two factors."""
    generator = torch.Generator().manual_seed(0)
    factors = torch.randint(0, 2, (64, 2), generator=generator)
    images = torch.zeros(64, 3, 16, 16)
    for i, (colour, side) in enumerate(factors.tolist()):
        images[i, 0 if colour == 0 else 2, 4:12, (1 if side == 0 else 9):(7 if side == 0 else 15)] = 1.0
    return images, factors


def test_kl_equals_torch_distributions():
    generator = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected, atol=1e-6)


def test_intervene_sets_one_dimension_per_row_and_keeps_the_rest():
    z = torch.arange(12.0).view(3, 4)
    out = intervene(z, torch.tensor([0, 3, 1]), torch.tensor([-1.0, -2.0, -3.0]))
    assert out.tolist() == [[-1, 1, 2, 3], [4, 5, 6, -2], [8, -3, 10, 11]]
    assert z[0, 0] == 0  # the input is not modified


def test_prototype_cluster_cost_on_a_hand_computed_case():
    mu = torch.tensor([[0.1, 2.0], [-1.0, 0.0]])
    values = torch.tensor([[0.0, 1.0], [1.5, -0.5]])
    # dim 0: 0.1 -> 0 (0.01), -1 -> 0 (1); dim 1: 2 -> 1.5 (0.25), 0 -> -0.5 (0.25); mean of four
    assert prototype_cluster_cost(mu, values).item() == pytest.approx((0.01 + 1 + 0.25 + 0.25) / 4)


def test_training_lowers_the_loss_and_the_plain_vae_skips_the_intervention_terms(coloured_squares):
    images, _ = coloured_squares
    torch.manual_seed(0)
    model = ProtoVAE(latent_dim=3, size=16, width=8, prototypes_per_dim=3, embed_dim=8)
    history = train_protovae(model, images, epochs=8, batch_size=16, lr=3e-3, beta=1.0, progress=False)
    assert history.reconstruction[-1] < 0.7 * history.reconstruction[0]
    assert history.identification[-1] < history.identification[0]
    torch.manual_seed(0)
    plain = ProtoVAE(latent_dim=3, size=16, width=8)
    before = [p.clone() for p in plain.identifier.parameters()]
    plain_history = train_protovae(plain, images, epochs=2, batch_size=16, identification_weight=0,
                                   consistency_weight=0, progress=False)
    assert plain_history.identification == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, plain.identifier.parameters()))
    mu, logvar = model.encode(images[:4])
    assert mu.shape == logvar.shape == (4, 3) and model.decode(mu).shape == (4, 3, 16, 16)


def test_intervention_effects_find_the_factor_each_dimension_controls():
    def decode(z: torch.Tensor) -> torch.Tensor:  # dim 0 paints red, dim 1 blue, dim 2 nothing
        red, blue = torch.sigmoid(5 * z[:, 0]), torch.sigmoid(5 * z[:, 1])
        return torch.stack([red, torch.zeros_like(red), blue], 1)[:, :, None, None].expand(-1, -1, 8, 8)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return (images.mean((2, 3))[:, [0, 2]] > 0.5).long()  # factors: red?, blue?

    codes = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    effects = intervention_effects(decode, codes, low=-torch.ones(3), high=torch.ones(3), predict=predict)
    assert torch.equal(effects, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    chosen = intervention_effects(decode, codes, -torch.ones(3), torch.ones(3), predict, dims=[2, 1])
    assert torch.equal(chosen, effects[[2, 1]])
    frames = traversal(decode, codes[0], 0, torch.linspace(-1, 1, 5))
    assert frames.shape == (5, 3, 8, 8) and (frames[:, 0, 0, 0].diff() > 0).all()
    assert torch.allclose(frames[:, 2], frames[0, 2].expand(5, -1, -1))  # blue kept


def test_decoder_of_a_representation_and_attribute_classifier_learn(coloured_squares):
    images, factors = coloured_squares
    torch.manual_seed(0)
    codes = torch.cat([factors.float() * 10 + 3, torch.randn(64, 2)], 1)  # an unstandardised representation
    decoder = RepresentationDecoder(4, size=16, width=8)
    losses = train_representation_decoder(decoder, codes, images, epochs=15, batch_size=16, lr=3e-3,
                                          progress=False)
    assert losses[-1] < 0.6 * losses[0]
    assert torch.allclose(decoder.mean, codes.mean(0)) and torch.allclose(decoder.std, codes.std(0))
    classifier = AttributeClassifier({"colour": 2, "side": 2}, size=16, width=8)
    train_attribute_classifier(classifier, images, factors, epochs=15, batch_size=16, lr=3e-3, progress=False)
    assert (classifier.predict(images) == factors).float().mean() > 0.95


def test_bad_input_raises_clear_errors(coloured_squares):
    images, factors = coloured_squares
    with pytest.raises(ValueError, match="multiple of 8"):
        ProtoVAE(size=30)
    with pytest.raises(ValueError, match="latent_dim"):
        ProtoVAE(latent_dim=0)
    model = ProtoVAE(latent_dim=3, size=16, width=8)
    with pytest.raises(ValueError, match="16×16"):
        model.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="0–255"):
        model.encode(images * 255)
    with pytest.raises(ValueError, match="index the 3 latent"):
        intervene(torch.zeros(2, 3), torch.tensor([0, 3]), torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        train_protovae(model, images, beta=-1.0, progress=False)
    with pytest.raises(ValueError, match="one code per image"):
        train_representation_decoder(RepresentationDecoder(4, size=16), torch.randn(3, 4), images, progress=False)
    with pytest.raises(ValueError, match="integer"):
        train_attribute_classifier(AttributeClassifier({"a": 2, "b": 2}, size=16), images, factors.float(),
                                   progress=False)
    with pytest.raises(ValueError, match="one value per dimension"):
        intervention_effects(lambda z: z, torch.randn(4, 3), torch.zeros(2), torch.zeros(3), lambda x: x)


@pytest.mark.parametrize("make", [lambda: ProtoVAE(latent_dim=3, size=16, width=8),
                                  lambda: RepresentationDecoder(5, size=16, width=8),
                                  lambda: AttributeClassifier({"colour": 2, "side": 3}, size=16, width=8)],
                         ids=["protovae", "decoder", "classifier"])
def test_factor_models_round_trip_through_a_verified_file(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    path = tmp_path / "model.pt"
    save_factor_model(model, path, epochs=3)
    write_checksum(path)
    loaded = load_factor_model(path, unregistered="error")
    assert type(loaded) is type(model) and loaded.metadata == {"epochs": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="checksum"):
        load_factor_model(path)
    with pytest.raises(FileNotFoundError, match="--preset shapes-protovae"):
        load_factor_model(tmp_path / "missing.pt")
