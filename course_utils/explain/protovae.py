"""ProtoVAE-style interventions (Patil et al. 2023; SCIENCE.md §12), small enough to train on a CPU.

A convolutional VAE encodes an image to ``z ∈ R^d``.  Each latent dimension ``i`` owns ``M`` prototype
values ``p_{i,1..M}`` (learned scalars pulled towards the codes, a one-dimensional cluster cost).  An
**intervention** sets one dimension to one of its prototype values and keeps the others:
``z' = z`` except ``z'_i = p_{i,m}``; the decoder shows what changed.  Training adds two terms to the VAE
loss so that every dimension's interventions change one recognisable thing:

- identification: a prototypical network embeds the pair (decode(z), decode(z')) and must tell *which*
  dimension was changed, by the nearest of ``d`` learned class prototypes (cross-entropy on −‖e − c_i‖²);
- consistency: re-encoding decode(z') gives back ``z'`` (the set value in dimension i, the old values
  elsewhere).

With both weights 0 the model is a plain β-VAE, the baseline.  The same interventions apply to any
representation through a decoder trained on it, such as SimCLR's frozen h (``RepresentationDecoder``), and
an attribute classifier trained on ShapesWorld's labels measures which factor each intervention changes
(``intervention_effects``).  ProtoVAE itself also uses a local-isometry term and a discriminator; this
course version leaves both out and says so where it is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.inputs import check_features, check_images
from course_utils.models import atomic_write, load_verified

FACTOR_MODEL_FORMAT = "ssl-xai-course/factor-model-v1"


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"image size must be a multiple of 8 (three stride-2 stages), got {size!r}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class ImageDecoder(nn.Module):
    """Codes [B, d] -> images [B, 3, size, size] in (0, 1): a linear layer to a 4·width × size/8 grid, then
    three stride-2 transposed convolutions."""

    def __init__(self, code_dim: int, size: int = 32, width: int = 32) -> None:
        super().__init__()
        _check_size(size)
        _positive("code_dim", code_dim)
        _positive("width", width)
        self.size, self.width, self.code_dim = size, width, code_dim
        self.fc = nn.Linear(code_dim, 4 * width * (size // 8) ** 2)
        self.up = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(width, 3, 4, 2, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        grid = self.fc(codes).view(len(codes), 4 * self.width, self.size // 8, self.size // 8)
        return torch.sigmoid(self.up(grid))


def _image_encoder(out_features: int, size: int, width: int, in_channels: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * width * (size // 8) ** 2, out_features))


class ProtoVAE(nn.Module):
    """VAE with per-dimension prototype values and an intervention identifier.

    Args:
        latent_dim: d.
        size: image side (a multiple of 8).
        width: channels of the first convolution.
        prototypes_per_dim: M prototype values per latent dimension (initialised spread over [-2, 2]).
        embed_dim: dimension of the identifier's embedding of an image pair.
    """

    def __init__(self, latent_dim: int = 10, size: int = 32, width: int = 32, prototypes_per_dim: int = 5,
                 embed_dim: int = 32) -> None:
        super().__init__()
        _check_size(size)
        for name, value in (("latent_dim", latent_dim), ("prototypes_per_dim", prototypes_per_dim),
                            ("embed_dim", embed_dim)):
            _positive(name, value)
        self.latent_dim, self.size = latent_dim, size
        self.config = {"latent_dim": latent_dim, "size": size, "width": width,
                       "prototypes_per_dim": prototypes_per_dim, "embed_dim": embed_dim}
        self.encoder = _image_encoder(2 * latent_dim, size, width)
        self.decoder = ImageDecoder(latent_dim, size, width)
        self.prototype_values = nn.Parameter(torch.linspace(-2, 2, prototypes_per_dim).repeat(latent_dim, 1))
        self.identifier = _image_encoder(embed_dim, size, width // 2 or 1, in_channels=6)
        self.dimension_prototypes = nn.Parameter(torch.randn(latent_dim, embed_dim) * 0.1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, size, size] in [0, 1] -> (μ [B, d], log σ² [B, d])."""
        images = check_images(images, "images", like=self.prototype_values)
        if images.shape[-2:] != (self.size, self.size):
            raise ValueError(f"this ProtoVAE takes {self.size}×{self.size} images, got "
                             f"{tuple(images.shape[-2:])}; resize them first")
        mu, logvar = self.encoder(images).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent codes [B, d] -> images [B, 3, size, size] in (0, 1)."""
        return self.decoder(z)

    def identify(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Which dimension changed between two images: logits −‖e − c_i‖² [B, d] for images [B, 3, S, S] each."""
        embedding = self.identifier(torch.cat([before, after], dim=1))
        return -torch.cdist(embedding, self.dimension_prototypes).square()


def intervene(z: torch.Tensor, dims: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Set dimension ``dims[b]`` of row b of z [B, d] to ``values[b]`` and keep the others: -> [B, d]."""
    if z.ndim != 2 or dims.shape != (len(z),) or values.shape != (len(z),):
        raise ValueError(f"need z [B, d], dims [B] and values [B], got {tuple(z.shape)}, {tuple(dims.shape)}, "
                         f"{tuple(values.shape)}")
    if len(dims) and (dims.min() < 0 or dims.max() >= z.shape[1]):
        raise ValueError(f"dims must index the {z.shape[1]} latent dimensions, got {dims.min()}..{dims.max()}")
    out = z.clone()
    out[torch.arange(len(z)), dims] = values.to(z.dtype)
    return out


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over dimensions: [B, d] -> [B]."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)


def prototype_cluster_cost(mu: torch.Tensor, prototype_values: torch.Tensor) -> torch.Tensor:
    """Mean over images and dimensions of the squared distance of μ_i to its nearest prototype value:
    μ [B, d], prototype_values [d, M] -> scalar."""
    return (mu[:, :, None] - prototype_values[None]).square().min(2).values.mean()


@dataclass
class VAEHistory:
    """Per-epoch means of the loss terms (reconstruction is the summed binary cross-entropy per image)."""

    reconstruction: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    identification: list[float] = field(default_factory=list)  # cross-entropy; 0 for a plain VAE
    identification_accuracy: list[float] = field(default_factory=list)
    consistency: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def train_protovae(model: ProtoVAE, images: torch.Tensor, epochs: int = 10, *, beta: float = 4.0,
                   identification_weight: float = 1.0, consistency_weight: float = 1.0, cluster_weight: float = 1.0,
                   batch_size: int = 128, lr: float = 1e-3, seed: int = 0, progress: bool = True) -> VAEHistory:
    """Train on images [N, 3, S, S] in [0, 1] (uint8 is accepted and divided by 255 batch by batch).

    Loss per batch: BCE reconstruction + β · KL + cluster_weight · prototype cluster cost
    + identification_weight · CE(identify(decode(μ), decode(μ')), i) + consistency_weight · ‖μ(decode(μ')) − μ'‖²,
    where μ' sets one random dimension i per image to one of its prototype values.  Both intervention
    weights 0 (and cluster_weight 0) train a plain β-VAE."""
    import time

    _positive("epochs", epochs)
    _positive("batch_size", batch_size)
    for name, value in (("beta", beta), ("identification_weight", identification_weight),
                        ("consistency_weight", consistency_weight), ("cluster_weight", cluster_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    as_float = (lambda x: x.float() / 255) if images.dtype == torch.uint8 else (lambda x: x)
    check_images(as_float(images[:2]), "images")
    device = model.prototype_values.device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    intervening = identification_weight > 0 or consistency_weight > 0
    history = VAEHistory()
    model.train()
    for _ in tqdm(range(epochs), desc="ProtoVAE" if intervening else "VAE", disable=not progress):
        started = time.perf_counter()
        sums = dict.fromkeys(("reconstruction", "kl", "identification", "accuracy", "consistency"), 0.0)
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            x = as_float(images[batch]).to(device)
            mu, logvar = model.encode(x)
            z = mu + torch.randn(mu.shape, generator=generator).to(device) * (0.5 * logvar).exp()
            reconstruction = F.binary_cross_entropy(model.decode(z), x, reduction="sum") / len(x)
            kl = kl_to_standard_normal(mu, logvar).mean()
            loss = reconstruction + beta * kl + cluster_weight * prototype_cluster_cost(mu, model.prototype_values)
            if intervening:
                dims = torch.randint(model.latent_dim, (len(x),), generator=generator).to(device)
                choice = torch.randint(model.prototype_values.shape[1], (len(x),), generator=generator).to(device)
                z_after = intervene(mu, dims, model.prototype_values[dims, choice])
                before, after = model.decode(mu), model.decode(z_after)
                logits = model.identify(before, after)
                identification = F.cross_entropy(logits, dims)
                consistency = (model.encode(after)[0] - z_after).square().sum(1).mean()
                loss = loss + identification_weight * identification + consistency_weight * consistency
                sums["identification"] += identification.item() * len(x)
                sums["accuracy"] += float((logits.argmax(1) == dims).sum())
                sums["consistency"] += consistency.item() * len(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["reconstruction"] += reconstruction.item() * len(x)
            sums["kl"] += kl.item() * len(x)
        n = len(images)
        history.reconstruction.append(sums["reconstruction"] / n)
        history.kl.append(sums["kl"] / n)
        history.identification.append(sums["identification"] / n)
        history.identification_accuracy.append(sums["accuracy"] / n)
        history.consistency.append(sums["consistency"] / n)
        history.seconds.append(time.perf_counter() - started)
    model.eval()
    return history


def _fit(model: nn.Module, count: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], epochs: int,
         batch_size: int, lr: float, seed: int, progress: bool, desc: str) -> list[float]:
    """Adam over ``count`` samples in shuffled batches of indices; ``batch_loss(indices)`` -> scalar.
    Returns the per-epoch mean loss; leaves the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress):
        total = 0.0
        for batch in torch.randperm(count, generator=generator).split(batch_size):
            loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / count)
    model.eval()
    return losses


class RepresentationDecoder(nn.Module):
    """Decoder from a frozen representation (e.g. SimCLR's h [B, r]) to images, trained by reconstruction;
    the inputs are standardised with the training mean and deviation stored in the module."""

    def __init__(self, code_dim: int, size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.config = {"code_dim": code_dim, "size": size, "width": width}
        self.decoder = ImageDecoder(code_dim, size, width)
        self.register_buffer("mean", torch.zeros(code_dim))
        self.register_buffer("std", torch.ones(code_dim))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, r] (unstandardised) -> images [B, 3, S, S]."""
        return self.decoder((codes - self.mean) / self.std)


def train_representation_decoder(decoder: RepresentationDecoder, codes: torch.Tensor, images: torch.Tensor,
                                 epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                                 progress: bool = True) -> list[float]:
    """Fit the decoder to images [N, 3, S, S] (float in [0, 1] or uint8) from codes [N, r] by summed BCE.
    Returns the per-epoch mean loss."""
    codes = check_features(codes, "codes")
    if len(codes) != len(images):
        raise ValueError(f"need one code per image, got {len(codes)} codes and {len(images)} images")
    _positive("epochs", epochs)
    as_float = (lambda x: x.float() / 255) if images.dtype == torch.uint8 else (lambda x: x)
    check_images(as_float(images[:2]), "images")
    device = decoder.mean.device
    decoder.mean.copy_(codes.mean(0).to(device))
    decoder.std.copy_(codes.std(0).clamp_min(1e-6).to(device))

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        x = as_float(images[batch]).to(device)
        return F.binary_cross_entropy(decoder(codes[batch].to(device)), x, reduction="sum") / len(x)

    return _fit(decoder, len(codes), batch_loss, epochs, batch_size, lr, seed, progress, "decoder")


def traversal(decode: Callable[[torch.Tensor], torch.Tensor], code: torch.Tensor, dim: int,
              values: torch.Tensor) -> torch.Tensor:
    """Decoded images of one code [d] with dimension ``dim`` set to each of ``values`` [T]: [T, 3, S, S]."""
    if code.ndim != 1 or not 0 <= dim < len(code):
        raise ValueError(f"need one code [d] and 0 <= dim < d, got shape {tuple(code.shape)} and dim {dim}")
    codes = code.repeat(len(values), 1)
    with torch.no_grad():
        return decode(intervene(codes, torch.full((len(values),), dim, device=code.device), values.to(code)))


def intervention_effects(decode: Callable[[torch.Tensor], torch.Tensor], codes: torch.Tensor, low: torch.Tensor,
                         high: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor],
                         batch_size: int = 256, dims: Sequence[int] | None = None) -> torch.Tensor:
    """How often each factor's predicted value changes when one dimension moves from ``low[i]`` to
    ``high[i]`` with the rest of the code kept.

    decode: codes [B, d] -> images; codes [N, d]; low, high [d]; predict: images -> factor predictions
    [B, K] (integers, e.g. an attribute classifier's argmax per factor); dims: the dimensions to intervene
    on (default all).  Returns [len(dims), K]: row i is the fraction of the N codes whose factor k differs
    between the two decoded images when dimension dims[i] moves."""
    codes = check_features(codes, "codes")
    if low.shape != (codes.shape[1],) or high.shape != (codes.shape[1],):
        raise ValueError(f"low and high must hold one value per dimension [{codes.shape[1]}], got "
                         f"{tuple(low.shape)} and {tuple(high.shape)}")
    dims = list(range(codes.shape[1])) if dims is None else [int(d) for d in dims]
    if not dims or min(dims) < 0 or max(dims) >= codes.shape[1]:
        raise ValueError(f"dims must be a non-empty list of dimensions in 0..{codes.shape[1] - 1}, got {dims}")
    rows = []
    with torch.no_grad():
        for dim in dims:
            changed = []
            for chunk in codes.split(batch_size):
                which = torch.full((len(chunk),), dim, device=chunk.device)
                a = predict(decode(intervene(chunk, which, low[dim].expand(len(chunk)).to(chunk))))
                b = predict(decode(intervene(chunk, which, high[dim].expand(len(chunk)).to(chunk))))
                changed.append((a != b).float())
            rows.append(torch.cat(changed).mean(0))
    return torch.stack(rows)


class AttributeClassifier(nn.Module):
    """A small CNN with one softmax head per factor: images [B, 3, S, S] -> logits per factor.

    The body keeps full resolution in its first two 3 × 3 convolutions (with batch normalisation) before
    three 2 × 2 max-pools: a shape's outline at 32 px is a few pixels wide, and the VAEs' strided encoder
    (``_image_encoder``) named fewer than three in four test shapes after 30 epochs on 20,000 images,
    too weak a judge of what an intervention changed."""

    def __init__(self, classes_per_factor: dict[str, int], size: int = 32, width: int = 32) -> None:
        super().__init__()
        _check_size(size)
        if not classes_per_factor or any(not isinstance(c, int) or c < 2 for c in classes_per_factor.values()):
            raise ValueError(f"classes_per_factor maps each factor to its number of values (>= 2), got "
                             f"{classes_per_factor!r}")
        self.config = {"classes_per_factor": dict(classes_per_factor), "size": size, "width": width}
        self.factors = list(classes_per_factor)
        def convolutions(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *convolutions(3, width), *convolutions(width, width), nn.MaxPool2d(2),
            *convolutions(width, 2 * width), *convolutions(2 * width, 2 * width), nn.MaxPool2d(2),
            *convolutions(2 * width, 4 * width), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4 * width * (size // 8) ** 2, 8 * width), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(8 * width, count) for name, count in classes_per_factor.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(check_images(images, "images", like=self.heads[self.factors[0]].weight))
        return {name: head(features) for name, head in self.heads.items()}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted value of every factor: [B, K] long, columns in the order of ``factors``."""
        with torch.no_grad():
            logits = self(images)
        return torch.stack([logits[name].argmax(1) for name in self.factors], dim=1)


def train_attribute_classifier(model: AttributeClassifier, images: torch.Tensor, factors: torch.Tensor,
                               epochs: int = 5, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                               progress: bool = True) -> list[float]:
    """Fit every head by cross-entropy on images [N, 3, S, S] (float or uint8) and factors [N, K] (long,
    columns in the order of ``model.factors``).  Returns the per-epoch mean loss (summed over heads)."""
    if factors.ndim != 2 or factors.shape != (len(images), len(model.factors)) or factors.is_floating_point():
        raise ValueError(f"factors must be integer [N, K] = [{len(images)}, {len(model.factors)}], got "
                         f"{tuple(factors.shape)} {factors.dtype}")
    _positive("epochs", epochs)
    as_float = (lambda x: x.float() / 255) if images.dtype == torch.uint8 else (lambda x: x)
    device = model.heads[model.factors[0]].weight.device

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(as_float(images[batch]).to(device))
        y = factors[batch].to(device)
        return sum(F.cross_entropy(logits[name], y[:, k]) for k, name in enumerate(model.factors))

    return _fit(model, len(images), batch_loss, epochs, batch_size, lr, seed, progress, "attribute classifier")


_KINDS: dict[str, type[nn.Module]] = {}  # filled below: the classes save_factor_model can write


def save_factor_model(model: nn.Module, path: str | Path, **metadata: object) -> None:
    """Write a ``ProtoVAE``, ``RepresentationDecoder`` or ``AttributeClassifier`` (config, fp32 CPU weights,
    metadata) atomically; ``load_factor_model`` reads it back."""
    kind = type(model).__name__
    if kind not in _KINDS:
        raise ValueError(f"save_factor_model writes {sorted(_KINDS)}, got a {kind}")
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {"format": FACTOR_MODEL_FORMAT, "kind": kind, "config": model.config, "state_dict": state,
               "metadata": metadata}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_factor_model(path: str | Path, unregistered: str = "warn") -> nn.Module:
    """Read a file of ``save_factor_model`` (checksum-verified by ``models.load_verified``), in eval mode.

    Raises:
        FileNotFoundError: no such file (with the command that trains the course's models).
        ValueError: not such a file, or its weights do not fit its config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"factor model not found: {path}; train the course's with "
                                "`python -m course_utils.train --preset shapes-protovae --commit`")
    payload, _ = load_verified(path, "cpu", unregistered, kind="factor model")
    if not isinstance(payload, dict) or payload.get("format") != FACTOR_MODEL_FORMAT or payload.get("kind") not in _KINDS:
        raise ValueError(f"{path} is not a {FACTOR_MODEL_FORMAT!r} file of one of {sorted(_KINDS)}")
    model = _KINDS[payload["kind"]](**payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the stored config {payload['config']}: {error}") from None
    model.metadata = dict(payload.get("metadata") or {})
    return model.eval()


_KINDS.update({cls.__name__: cls for cls in (ProtoVAE, RepresentationDecoder, AttributeClassifier)})
