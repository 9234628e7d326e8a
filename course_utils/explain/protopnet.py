"""ProtoPNet ("this looks like that", Chen et al. 2019) as a head on a course encoder (SCIENCE.md §11).

The encoder up to a chosen stage gives a feature map; add-on 1×1 convolutions (the last with a sigmoid)
map it to ``A ∈ R^{D×h×w}``.  Each class owns ``m`` prototypes ``p_j ∈ R^D``; a prototype's distance to an
image is the smallest squared L2 distance to any patch (one spatial position of ``A``),

    d_j = min_{patches z of A} ‖z − p_j‖²,      g_j = log((d_j + 1) / (d_j + ε)),  ε = 1e-4,

and the logits are ``W g`` with W initialised to +1 for the prototype's own class and −0.5 otherwise.
Training follows the paper's stages: warm-up (add-on and prototypes; the encoder frozen), joint (also the
encoder, when it is fine-tuned), push (every prototype replaced by the nearest training patch of its
class, whose image and position are kept), and last layer only (cross-entropy + λ_L1 on the off-class
weights, a convex problem because the similarities are then fixed).  The loss of the first two stages is

    CE + λ_clst · Clst + λ_sep · Sep,   Clst = mean_i min_{j ∈ class(y_i)} d_ij,
                                         Sep = −mean_i min_{j ∉ class(y_i)} d_ij      (λ 0.8 and 0.08).

With a frozen encoder the encoder's features are computed once, so a head trains in seconds on a CPU.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.inputs import check_images

STAGES = ("layer1", "layer2", "layer3", "layer4")


def log_similarity(distances: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """ProtoPNet's similarity ``log((d + 1) / (d + eps))`` of squared distances ``d >= 0`` (any shape).

    It is ``log(1 / eps)`` at ``d = 0`` and falls towards 0 as ``d`` grows.

    Raises:
        ValueError: ``eps`` not positive, or a distance negative or not finite.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it bounds the similarity at d = 0 by log(1/eps)), got {eps}")
    if not torch.isfinite(distances).all():
        raise ValueError("distances contain NaN or inf; check the features they were computed from")
    if (distances < 0).any():
        raise ValueError(f"squared distances must be >= 0, got a minimum of {distances.min().item():.4g}")
    return torch.log((distances + 1) / (distances + eps))


def patch_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every patch to every prototype: features [B, D, h, w], prototypes [P, D]
    -> [B, P, h, w] (expanded as ‖z‖² − 2 z·p + ‖p‖², clamped at 0 against rounding)."""
    if features.ndim != 4 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"need features [B, D, h, w] and prototypes [P, D] with the same D, got "
                         f"{tuple(features.shape)} and {tuple(prototypes.shape)}")
    z_norm = features.square().sum(1, keepdim=True)  # [B, 1, h, w]
    cross = torch.einsum("bdhw,pd->bphw", features, prototypes)
    p_norm = prototypes.square().sum(1)[None, :, None, None]
    return (z_norm - 2 * cross + p_norm).clamp_min(0)


def cluster_cost(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """Clst = mean over images of the smallest distance to a prototype of the image's own class.

    min_distances [B, P], labels [B] (long), prototype_class [P] (long) -> scalar."""
    own = prototype_class[None, :] == labels[:, None]  # [B, P]
    return min_distances.masked_fill(~own, math.inf).min(1).values.mean()


def separation_cost(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor
                    ) -> torch.Tensor:
    """Sep = −mean over images of the smallest distance to a prototype of another class (a loss term:
    minimising it pushes other classes' prototypes away).  Shapes as ``cluster_cost``."""
    other = prototype_class[None, :] != labels[:, None]
    return -min_distances.masked_fill(~other, math.inf).min(1).values.mean()


def off_class_l1(weight: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """Σ |W_kj| over the weights from prototype j to a class k other than its own: weight [K, P] -> scalar."""
    own = torch.arange(weight.shape[0], device=weight.device)[:, None] == prototype_class[None, :]
    return weight.masked_fill(own, 0).abs().sum()


@dataclass
class ProtoPNetOutput:
    """What the head computes for a batch of B images (P prototypes, K classes, h × w patches)."""

    logits: torch.Tensor  # [B, K]
    min_distances: torch.Tensor  # [B, P]: d_j, the closest patch's squared distance
    distances: torch.Tensor  # [B, P, h, w]: every patch's squared distance


class ProtoPNet(nn.Module):
    """A ProtoPNet head on a course ``ResNet``: images [B, 3, H, W] in [0, 1] -> logits [B, K].

    Args:
        encoder: a course ``ResNet`` (``models.resnet``, ``load_pretrained(...).encoder``, ``import_encoder``).
        num_classes: K.
        layer: the encoder stage whose feature map the prototypes live in (``"layer1"`` … ``"layer4"``).
        prototypes_per_class: m (P = m · K prototypes; prototype j belongs to class j // m).
        prototype_dim: D, the channels of the add-on layers' output.
        eps: ε of the similarity.
        seed: initialises the add-on layers and the prototypes (uniform in [0, 1], as the paper).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, layer: str = "layer3", prototypes_per_class: int = 5,
                 prototype_dim: int = 64, eps: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        if layer not in STAGES or not all(hasattr(encoder, name) for name in ("normalize", "stem", *STAGES)):
            raise ValueError(f"layer must be one of {STAGES} of a course ResNet (models.resnet / import_encoder), "
                             f"got layer={layer!r} on a {type(encoder).__name__}")
        for name, value in (("num_classes", num_classes), ("prototypes_per_class", prototypes_per_class),
                            ("prototype_dim", prototype_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.normalize, self.layer, self.eps = encoder.normalize, layer, eps
        stages = STAGES[:STAGES.index(layer) + 1]
        self.trunk = nn.Sequential(encoder.stem, *(getattr(encoder, name) for name in stages))
        channels = _output_channels(getattr(encoder, layer))
        generator = torch.Generator().manual_seed(seed)
        self.add_on = nn.Sequential(nn.Conv2d(channels, prototype_dim, 1), nn.ReLU(),
                                    nn.Conv2d(prototype_dim, prototype_dim, 1), nn.Sigmoid())
        for module in self.add_on:
            if isinstance(module, nn.Conv2d):
                bound = 1 / math.sqrt(module.in_channels)
                with torch.no_grad():
                    module.weight.uniform_(-bound, bound, generator=generator)
                    module.bias.zero_()
        count = num_classes * prototypes_per_class
        self.prototypes = nn.Parameter(torch.rand(count, prototype_dim, generator=generator))
        self.register_buffer("prototype_class", torch.arange(count) // prototypes_per_class)
        self.last_layer = nn.Linear(count, num_classes, bias=False)
        with torch.no_grad():
            own = torch.arange(num_classes)[:, None] == self.prototype_class[None, :]
            self.last_layer.weight.copy_(torch.where(own, 1.0, -0.5))
        self.num_classes, self.prototypes_per_class = num_classes, prototypes_per_class

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's feature map at ``layer``: images [B, 3, H, W] in [0, 1] -> [B, C, h, w]."""
        images = check_images(images, "images", like=self.prototypes)
        return self.trunk(self.normalize(images))

    def head(self, features: torch.Tensor) -> ProtoPNetOutput:
        """Logits and distances from the encoder's feature map [B, C, h, w]."""
        distances = patch_distances(self.add_on(features), self.prototypes)
        min_distances = distances.flatten(2).min(2).values
        logits = self.last_layer(log_similarity(min_distances, self.eps))
        return ProtoPNetOutput(logits, min_distances, distances)

    def explain(self, images: torch.Tensor) -> ProtoPNetOutput:
        """``head(features(images))``: logits [B, K], d [B, P] and patch distances [B, P, h, w]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> logits [B, K]."""
        return self.explain(images).logits

    def similarity_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Every prototype's similarity ``log((‖z − p_j‖² + 1)/(‖z − p_j‖² + ε))`` at every patch, upsampled
        bilinearly to the image: images [B, 3, H, W] -> [B, P, H, W] (detached)."""
        with torch.no_grad():
            similarity = log_similarity(self.explain(images).distances, self.eps)
        return F.interpolate(similarity, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _output_channels(stage: nn.Module) -> int:
    """Channels a ResNet stage puts out: those of its last convolution's last BatchNorm."""
    norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError("the chosen stage has no BatchNorm2d layer to read its output channels from")
    return norms[-1].num_features


def protopnet_loss(output: ProtoPNetOutput, labels: torch.Tensor, prototype_class: torch.Tensor,
                   lambda_clst: float = 0.8, lambda_sep: float = 0.08) -> torch.Tensor:
    """CE + λ_clst · Clst + λ_sep · Sep (SCIENCE.md §11) of one batch: a scalar."""
    return (F.cross_entropy(output.logits, labels)
            + lambda_clst * cluster_cost(output.min_distances, labels, prototype_class)
            + lambda_sep * separation_cost(output.min_distances, labels, prototype_class))


@dataclass
class PushRecord:
    """Where every prototype came from after the push: the training image, the patch's row and column in
    the h × w feature map, and the patch's distance before the push (how far the prototype moved)."""

    image_index: torch.Tensor  # [P] long, into the training images
    row: torch.Tensor  # [P] long
    col: torch.Tensor  # [P] long
    moved: torch.Tensor  # [P] float: ‖p_j(before) − p_j(after)‖²


@dataclass
class ProtoPNetHistory:
    """Per-epoch training records of ``train_protopnet``."""

    stage: list[str] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)  # training accuracy of the epoch
    push: PushRecord | None = None


def _check_labels(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be a vector [N] with one class per image, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__} "
                         f"for {len(images)} images")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}; use labels.long()")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (the model has {num_classes} classes), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return labels.long()


def encoder_features(model: ProtoPNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen encoder's feature maps of all images, computed once: [N, 3, H, W] -> [N, C, h, w]."""
    was_training = model.trunk.training
    model.trunk.eval()
    with torch.no_grad():
        out = torch.cat([model.features(batch) for batch in check_images(images).split(batch_size)])
    model.trunk.train(was_training)
    return out


def stage_features(encoder: nn.Module, images: torch.Tensor, layers: Sequence[str], batch_size: int = 256
                   ) -> dict[str, torch.Tensor]:
    """The outputs of several stages of a course ResNet in one pass: images [N, 3, H, W] in [0, 1] ->
    {layer: [N, C_layer, h_layer, w_layer]} on the CPU (eval mode, no gradients).  Heads at different layers
    can then share one forward pass (``train_protopnet(..., features=...)``)."""
    unknown = sorted(set(layers) - set(STAGES))
    if unknown or not layers:
        raise ValueError(f"layers must be a non-empty subset of {STAGES}, got {list(layers)}")
    images = check_images(images, "images")
    device = next(encoder.parameters()).device
    deepest = max(STAGES.index(name) for name in layers)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        for batch in images.split(batch_size):
            activation = encoder.stem(encoder.normalize(batch.to(device)))
            for name in STAGES[:deepest + 1]:
                activation = getattr(encoder, name)(activation)
                if name in out:
                    out[name].append(activation.cpu())
    encoder.train(was_training)
    return {name: torch.cat(parts) for name, parts in out.items()}


def push_prototypes(model: ProtoPNet, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
                    ) -> PushRecord:
    """Replace every prototype by the nearest add-on patch of a training image of its own class.

    features: the encoder's feature maps [N, C, h, w] (``encoder_features``); labels [N].
    Every class needs at least one image.  Returns where each prototype now comes from."""
    labels = _check_labels(features, labels, model.num_classes)
    missing = sorted(set(range(model.num_classes)) - set(labels.unique().tolist()))
    if missing:
        raise ValueError(f"push needs training images of every class; none of class(es) {missing}")
    count = model.prototypes.shape[0]
    best = torch.full((count,), math.inf)
    best_index = torch.zeros(count, dtype=torch.long)
    best_position = torch.zeros(count, dtype=torch.long)
    best_patch = torch.zeros_like(model.prototypes, device="cpu")
    own_class = model.prototype_class.cpu()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            patches = model.add_on(features[start:start + batch_size].to(model.prototypes.device))  # [b, D, h, w]
            distances = patch_distances(patches, model.prototypes).flatten(2).cpu()  # [b, P, h·w]
            batch_labels = labels[start:start + batch_size]
            own = batch_labels[:, None] == own_class[None, :]  # [b, P]
            distances = distances.masked_fill(~own[:, :, None], math.inf)
            value, position = distances.min(2)  # [b, P]
            batch_best, image = value.min(0)  # [P]
            better = batch_best < best
            if better.any():
                flat = patches.flatten(2).cpu()  # [b, D, h·w]
                chosen = position[image, torch.arange(count)]
                best[better], best_index[better] = batch_best[better], start + image[better]
                best_position[better] = chosen[better]
                best_patch[better] = flat[image[better], :, chosen[better]]
        moved = (model.prototypes.detach().cpu() - best_patch).square().sum(1)
        model.prototypes.copy_(best_patch.to(model.prototypes.device))
    model.train(was_training)
    width = features.shape[-1]
    return PushRecord(best_index, best_position // width, best_position % width, moved)


def train_protopnet(model: ProtoPNet, images: torch.Tensor, labels: torch.Tensor, *, warm_epochs: int = 5,
                    joint_epochs: int = 0, last_layer_epochs: int = 20, batch_size: int = 128, lr: float = 3e-3,
                    encoder_lr: float = 1e-4, lambda_clst: float = 0.8, lambda_sep: float = 0.08,
                    lambda_l1: float = 1e-4, seed: int = 0, progress: bool = True,
                    features: torch.Tensor | None = None) -> ProtoPNetHistory:
    """The paper's stages on images [N, 3, H, W] in [0, 1] with labels [N]: warm-up, joint, push, last layer.

    ``joint_epochs = 0`` keeps the encoder frozen throughout (its features are then computed once); with
    ``joint_epochs > 0`` the encoder is fine-tuned at ``encoder_lr`` in the joint stage (slower: every
    batch runs the encoder).  The last-layer stage optimises CE + ``lambda_l1`` · ``off_class_l1`` on the
    fixed similarities of the pushed prototypes.  ``features``: the frozen encoder's feature maps of
    ``images`` at the head's layer [N, C, h, w] when already computed (``encoder_features``; several heads
    can share them), only with ``joint_epochs = 0``.  Returns the per-epoch loss and training accuracy and
    the push record."""
    images = check_images(images, "images")
    labels = _check_labels(images, labels, model.num_classes)
    for name, value in (("warm_epochs", warm_epochs), ("joint_epochs", joint_epochs),
                        ("last_layer_epochs", last_layer_epochs)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = model.prototypes.device
    generator = torch.Generator().manual_seed(seed)
    history = ProtoPNetHistory()
    head_parameters = [*model.add_on.parameters(), model.prototypes]

    def epochs(stage: str, count: int, parameters: list[nn.Parameter], step_lr: list[float],
               inputs: torch.Tensor, from_images: bool, loss_of) -> None:
        if count == 0:
            return
        optimizer = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(parameters, step_lr)])
        for epoch in tqdm(range(count), desc=stage, disable=not progress, leave=False):
            order = torch.randperm(len(inputs), generator=generator)
            total, correct = 0.0, 0
            for batch in order.split(batch_size):
                x, y = inputs[batch].to(device), labels[batch].to(device)
                output = model.explain(x) if from_images else model.head(x)
                loss = loss_of(output, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                correct += int((output.logits.argmax(1) == y).sum())
            history.stage.append(stage)
            history.loss.append(total / len(inputs))
            history.accuracy.append(correct / len(inputs))

    def main_loss(output: ProtoPNetOutput, y: torch.Tensor) -> torch.Tensor:
        return protopnet_loss(output, y, model.prototype_class, lambda_clst, lambda_sep)

    model.train()
    model.trunk.eval()  # a frozen encoder keeps its BatchNorm statistics
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    model.last_layer.weight.requires_grad_(False)
    if features is not None:
        if joint_epochs:
            raise ValueError("features were computed by the frozen encoder; joint_epochs > 0 changes the encoder, "
                             "so pass images only")
        expected = encoder_features(model, images[:1]).shape[1:]
        if features.shape != (len(images), *expected):
            raise ValueError(f"features must be the encoder's {model.layer} maps of the images, "
                             f"[{len(images)}, {', '.join(map(str, expected))}], got {tuple(features.shape)}")
    elif warm_epochs or not joint_epochs:
        features = encoder_features(model, images)
    epochs("warm-up", warm_epochs, head_parameters, [lr] * len(head_parameters), features, False, main_loss)
    if joint_epochs:
        model.trunk.train()
        trunk_parameters = list(model.trunk.parameters())
        for p in trunk_parameters:
            p.requires_grad_(True)
        epochs("joint", joint_epochs, trunk_parameters + head_parameters,
               [encoder_lr] * len(trunk_parameters) + [lr] * len(head_parameters), images, True, main_loss)
        for p in trunk_parameters:
            p.requires_grad_(False)
        model.trunk.eval()
        features = encoder_features(model, images)
    history.push = push_prototypes(model, features, labels)

    model.eval()
    with torch.no_grad():  # after the push nothing but W changes: the similarities are fixed
        similarities = torch.cat([log_similarity(model.head(f.to(device)).min_distances, model.eps).cpu()
                                  for f in features.split(256)])
    model.last_layer.weight.requires_grad_(True)
    optimizer = torch.optim.Adam(model.last_layer.parameters(), lr=lr)
    for _ in tqdm(range(last_layer_epochs), desc="last layer", disable=not progress, leave=False):
        total, correct = 0.0, 0
        for batch in torch.randperm(len(similarities), generator=generator).split(batch_size):
            g, y = similarities[batch].to(device), labels[batch].to(device)
            logits = model.last_layer(g)
            loss = F.cross_entropy(logits, y) + lambda_l1 * off_class_l1(model.last_layer.weight,
                                                                          model.prototype_class)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            correct += int((logits.argmax(1) == y).sum())
        history.stage.append("last layer")
        history.loss.append(total / len(similarities))
        history.accuracy.append(correct / len(similarities))
    model.last_layer.weight.requires_grad_(False)
    return history


@dataclass
class PrototypeEvidence:
    """"This looks like that" for one image: its top prototypes for the predicted class."""

    predicted: int
    prototype: torch.Tensor  # [k] indices, strongest evidence first
    similarity: torch.Tensor  # [k] g_j
    contribution: torch.Tensor  # [k] g_j · W_{ŷ, j}
    row: torch.Tensor  # [k] the image's most similar patch to each prototype
    col: torch.Tensor  # [k]


def top_prototypes(model: ProtoPNet, image: torch.Tensor, k: int = 3) -> PrototypeEvidence:
    """The ``k`` prototypes with the largest ``g_j · W_{ŷ,j}`` for one image [3, H, W] (ŷ the prediction),
    with the image's most similar patch to each."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"pass one image [3, H, W], got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    count = model.prototypes.shape[0]
    if not isinstance(k, int) or not 1 <= k <= count:
        raise ValueError(f"k must be an integer in 1..{count} (the number of prototypes), got {k!r}")
    model.eval()
    with torch.no_grad():
        output = model.explain(image[None])
    predicted = int(output.logits.argmax(1))
    similarity = log_similarity(output.min_distances[0], model.eps)
    contribution = similarity * model.last_layer.weight[predicted]
    order = contribution.topk(k).indices
    width = output.distances.shape[-1]
    position = output.distances[0, order].flatten(1).argmin(1)
    return PrototypeEvidence(predicted, order.cpu(), similarity[order].cpu(), contribution[order].cpu(),
                             (position // width).cpu(), (position % width).cpu())


def evidence_maps(model: ProtoPNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """ProtoPNet's own explanation of each prediction as a saliency map: the similarity map of the
    prototype with the largest evidence ``g_j · W_{ŷ,j}`` for the predicted class ŷ (the first row of
    ``top_prototypes``), upsampled to the image.  images [B, 3, H, W] -> [B, H, W] (detached), scored
    like any saliency map (pointing game, mask IoU, deletion)."""
    images = check_images(images, "images")
    model.eval()
    maps = []
    with torch.no_grad():
        for batch in images.split(batch_size):
            output = model.explain(batch)
            evidence = log_similarity(output.min_distances, model.eps) * model.last_layer.weight[output.logits.argmax(1)]
            similarity = log_similarity(output.distances[torch.arange(len(batch)), evidence.argmax(1)], model.eps)
            maps.append(F.interpolate(similarity[:, None], size=batch.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0])
    return torch.cat(maps)
