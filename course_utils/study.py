"""The interpretability-vs-performance study of notebook 08 (SCIENCE.md section 9).

A grid of SimCLR encoders that differ in one factor at a time (depth, width, training length, colour
jitter, Q-Score regularisation, plus an untrained reference, and the base recipe repeated with other training
seeds for the seed-to-seed spread) is measured twice on ShapesWorld:

* performance: linear-probe accuracy on frozen h (held-out test split);
* interpretability, on ground truth: pointing game, mask IoU and deletion AUC of five saliency
  explainers (Grad-CAM with the probe class, the contrastive view-pair loss and the top feature of h;
  RELAX; AGF with the probe class), FALCON's concept precision P@1, and the share of nuisance concepts
  (object colour, background colour) that TCAV finds significant for the probe's classes.

    python -m course_utils.study                   # the CPU grid, full settings (1-2 minutes per encoder)
    python -m course_utils.study --quick           # the same grid, small settings (CI)
    python -m course_utils.study --grid gpu --train  # train the larger grid first (GPU recommended)

Results are cached per encoder in ``data/cache/study`` (keyed by the checkpoint's sha256 and the
settings), so a re-run only measures what changed.  Uncertainty (SCIENCE.md section 10): every saliency
measure is kept per image (paired bootstrap intervals between encoders), ``seed_spread`` / ``factor_effects``
compare a factor's effect with the spread between seeds of the base recipe, and ``improvement_correlations``
gives each Spearman rho its exact or permutation p-value (``stats.spearman_test``), the base counted once.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from course_utils import stats
from course_utils.data.augment import SimCLRAugment
from course_utils.data.datasets import default_data_root
from course_utils.data.shapes import ShapesWorld, select_samples
from course_utils.models import (
    SimCLRModel, atomic_write, checkpoint_dir, load_checkpoint, load_pretrained, resnet, save_checkpoint,
    verify_checksum, write_checksum,
)
from course_utils.runtime import autocast, get_device, quick_mode, seed_everything
from course_utils.train import NO_COLOUR

BASE_CHECKPOINT = "simclr-shapes-r10"
TRAIN_WORLD = {"n": 20_000, "size": 32, "seed": 0}  # the world of the committed encoders (train.PRESETS)
FINETUNE_EPOCHS = 2
FINETUNE_LR = 1e-4
QSCORE_LAMBDA = 0.1  # notebook 04's strong penalty; the thesis' 1e-4 changes nothing measurable here
QSCORE_EPS = 4.0


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of the grid.

    Attributes:
        name: short label used in tables and figures.
        factor: the factor this encoder varies against the base ("base", "depth", "width",
            "training length", "colour jitter", "Q-Score regularisation", "untrained").
        depth, width, epochs: architecture (``models.resnet``) and SimCLR epochs on ``TRAIN_WORLD``.
        colour: colour jitter and grayscale in the augmentation.
        finetune: None, "control" (the base fine-tuned with plain SimCLR) or "qscore" (fine-tuned with the
            Q-Score penalty of eq. 3.3), ``FINETUNE_EPOCHS`` epochs at ``FINETUNE_LR``.
        checkpoint: the committed checkpoint that is this encoder (``data/checkpoints``), else the file
            ``<name>.pt`` in the grid's folder.
        seed: the training seed (the "seed" factor repeats the base recipe with other seeds, so that a
            difference between encoders can be compared with the seed-to-seed spread, SCIENCE.md §10).
    """

    name: str
    factor: str
    depth: int = 10
    width: int = 32
    epochs: int = 25
    colour: bool = True
    finetune: str | None = None
    checkpoint: str | None = None
    seed: int = 0


GRIDS: dict[str, list[EncoderSpec]] = {
    "cpu": [
        EncoderSpec("r10-w32", "base", checkpoint=BASE_CHECKPOINT),
        EncoderSpec("r10-w32-8ep", "training length", epochs=8, checkpoint="simclr-shapes-r10-8ep"),
        EncoderSpec("r10-w32-nocolour", "colour jitter", colour=False, checkpoint="simclr-shapes-r10-nocolor"),
        EncoderSpec("r10-w32-seed1", "seed", seed=1),
        EncoderSpec("r10-w32-seed2", "seed", seed=2),
        EncoderSpec("r10-w16-25ep", "width", width=16),
        EncoderSpec("r18-w16", "depth", depth=18, width=16),
        EncoderSpec("r10-w32-ft", "Q-Score regularisation", finetune="control"),
        EncoderSpec("r10-w32-ft-qscore", "Q-Score regularisation", finetune="qscore"),
        EncoderSpec("r10-w32-untrained", "untrained", epochs=0),
    ],
}
GRIDS["gpu"] = GRIDS["cpu"] + [
    EncoderSpec("r10-w64", "width", width=64),
    EncoderSpec("r18-w32", "depth", depth=18),
    EncoderSpec("r18-w64", "depth", depth=18, width=64),
    EncoderSpec("r10-w32-100ep", "training length", epochs=100),
    EncoderSpec("r18-w64-nocolour", "colour jitter", depth=18, width=64, colour=False),
]


def grid_dir(grid: str) -> Path:
    """Where the grid's trained encoders live: committed (``data/checkpoints/study``) for the CPU grid,
    ``<data root>/study/<grid>`` for the others."""
    return checkpoint_dir() / "study" if grid == "cpu" else default_data_root() / "study" / grid


def select_encoders(grid: str, names: Sequence[str] | None = None) -> list[EncoderSpec]:
    """The specs of ``grid``, or of the encoders ``names`` in it (in the grid's order)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
    if names is None:
        return GRIDS[grid]
    unknown = set(names) - {spec.name for spec in GRIDS[grid]}
    if unknown:
        raise ValueError(f"not in grid {grid!r}: {', '.join(sorted(unknown))}; it has "
                         f"{', '.join(spec.name for spec in GRIDS[grid])}")
    return [spec for spec in GRIDS[grid] if spec.name in names]


def checkpoint_path(spec: EncoderSpec, grid: str) -> Path | None:
    """The file of a trained encoder (None for the untrained reference, which is built from a seed)."""
    if spec.epochs == 0:
        return None
    if spec.checkpoint is not None:
        return checkpoint_dir() / f"{spec.checkpoint}.pt"
    return grid_dir(grid) / f"{spec.name}.pt"


def load_encoder(spec: EncoderSpec, grid: str, seed: int = 0) -> SimCLRModel:
    """The SimCLR model (encoder + projector) of ``spec``, in eval mode on the CPU.

    Raises:
        FileNotFoundError: the encoder is not trained yet, with the command that trains it.
    """
    if spec.epochs == 0:
        torch.manual_seed(seed)
        return SimCLRModel(resnet(spec.depth, spec.width)).eval()
    if spec.checkpoint is not None:
        return load_pretrained(spec.checkpoint)
    path = checkpoint_path(spec, grid)
    if not path.is_file():
        raise FileNotFoundError(f"encoder {spec.name} of grid {grid!r} is not trained yet ({path} is missing); "
                                f"train it with `python -m course_utils.study --grid {grid} --train`")
    return load_checkpoint(path)


def train_encoder(spec: EncoderSpec, grid: str, device: torch.device | None = None,
                  progress: bool = True) -> Path:
    """Train ``spec`` (SimCLR from scratch, or a fine-tuning of the base) and save it atomically.

    The CPU grid's files go to ``data/checkpoints/study`` with their sha256 in ``SHA256SUMS``.
    """
    path = checkpoint_path(spec, grid)
    if path is None or spec.checkpoint is not None:
        raise ValueError(f"{spec.name} is not trained by the study (it is untrained or a committed checkpoint)")
    device = device or get_device()
    seed = spec.seed
    seed_everything(seed)
    world = ShapesWorld(split="train", **TRAIN_WORLD)
    started = time.perf_counter()
    if spec.finetune is None:
        model = SimCLRModel(resnet(spec.depth, spec.width))
        augment = SimCLRAugment(TRAIN_WORLD["size"], **({} if spec.colour else NO_COLOUR))
        history = _train(model, world, spec.epochs, 2e-3, 0.03, augment, device, seed, progress, None)
    else:
        if spec.finetune not in ("control", "qscore"):
            raise ValueError(f"finetune must be None, 'control' or 'qscore', got {spec.finetune!r}")
        model = load_pretrained(BASE_CHECKPOINT)
        penalty: Callable[[torch.Tensor], torch.Tensor] | None = None
        if spec.finetune == "qscore":
            from course_utils.explain.qscore import qscore, qscore_penalty
            from course_utils.simclr import extract_features

            population = ShapesWorld(n=5_000, size=TRAIN_WORLD["size"], seed=seed + 11, split="train")
            H, _ = extract_features(model.encoder, population, device=device, progress=False)
            penalty = partial(qscore_penalty, discriminative=qscore(H, eps=QSCORE_EPS).discriminative,
                              eps=QSCORE_EPS, lambda1=QSCORE_LAMBDA, lambda2=QSCORE_LAMBDA)
        history = _train(model, world, FINETUNE_EPOCHS, FINETUNE_LR, 0.0, SimCLRAugment(TRAIN_WORLD["size"]),
                         device, seed, progress, penalty)
    metadata = {"study": asdict(spec), "grid": grid, "device": str(device), "seed": seed,
                "train_minutes": round((time.perf_counter() - started) / 60, 2),
                "loss": [round(v, 4) for v in history.loss],
                "command": f"python -m course_utils.study --grid {grid} --train"}
    save_checkpoint(model.cpu(), path, **metadata)
    if grid == "cpu":
        write_checksum(path)
    return path


def _train(model: SimCLRModel, world: ShapesWorld, epochs: int, lr: float, warmup: float, augment: SimCLRAugment,
           device: torch.device, seed: int, progress: bool,
           penalty: Callable[[torch.Tensor], torch.Tensor] | None) -> Any:
    from course_utils.simclr import train_simclr

    return train_simclr(model, world, epochs, batch_size=256, lr=lr, temperature=0.2, warmup_fraction=warmup,
                        augment=augment, seed=seed, device=device, progress=progress, penalty=penalty)


# --------------------------------------------------------------------------
# Measuring one encoder
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class StudySettings:
    """How much of each measurement to run (``FULL`` or ``QUICK``).

    Attributes:
        n_train, n_test: linear-probe training images (train split) and held-out images (test split).
        n_explain: test images explained by every saliency explainer (pointing game, IoU, deletion AUC).
        deletion_steps: points of each deletion curve minus one.
        relax_masks: RELAX masks per image (``normalize=True``, the reference code's estimator).
        layer: the Grad-CAM layer (and TCAV's): ``layer3`` is 8 × 8 at 32 px.
        pg_tolerance: pointing-game tolerance in pixels (15 px at 224 px, scaled to 32 px).
        falcon_probe: FALCON's probe set (test split, 30 % with a distractor bar, as notebook 05).
        tcav_classes, tcav_inputs, tcav_examples, tcav_random_sets: TCAV of the probe's logit for the
            first ``tcav_classes`` classes, on ``tcav_inputs`` test images each, with ``tcav_random_sets``
            random sets of ``tcav_examples`` training images and, per concept, one fresh sample of as many
            matching training images per random set (the calibrated design of notebook 07).
    """

    n_train: int = 5_000
    n_test: int = 2_000
    n_explain: int = 100
    deletion_steps: int = 16
    relax_masks: int = 600
    layer: str = "layer3"
    pg_tolerance: int = 2
    falcon_probe: int = 3_000
    tcav_classes: int = 4
    tcav_inputs: int = 40
    tcav_examples: int = 40
    tcav_random_sets: int = 20
    seed: int = 0


FULL = StudySettings()
QUICK = StudySettings(n_train=1_000, n_test=500, n_explain=16, deletion_steps=8, relax_masks=150, falcon_probe=1_000,
                      tcav_classes=1, tcav_inputs=20, tcav_examples=30, tcav_random_sets=3)
SALIENCY_EXPLAINERS = ["Grad-CAM (probe class)", "Grad-CAM (contrastive)", "Grad-CAM (top feature)", "RELAX",
                       "AGF (probe class)"]
PROTOPNET = "ProtoPNet (prototype map)"  # the interpretable-by-design point (notebook 10)


@dataclass(frozen=True)
class ProtoPNetSettings:
    """The interpretable-by-design point of every encoder (issue 21, notebook 10): a ProtoPNet head
    (``course_utils.explain.protopnet``) on the frozen encoder, trained on the linear probe's ``n_train``
    training images; its accuracy on the probe's ``n_test`` test images (paired with the probe's, image by
    image) and its own explanation, the top prototype's similarity map (``protopnet.evidence_maps``), scored
    on the same ``n_explain`` test images as the post-hoc explainers. Measured and cached apart from
    ``evaluate_encoder``, so adding it re-measured nothing else.

    Attributes:
        layer: the stage the prototypes live on (notebook 10 chooses it on val for the base encoder).
        prototypes_per_class, warm_epochs, last_layer_epochs: as ``protopnet.train_protopnet``.
    """

    layer: str = "layer4"
    prototypes_per_class: int = 5
    warm_epochs: int = 10
    last_layer_epochs: int = 20


PROTOPNET_FULL = ProtoPNetSettings()
PROTOPNET_QUICK = ProtoPNetSettings(warm_epochs=2, last_layer_epochs=5)
NUISANCE_CONCEPTS = {"red object": {"color": "red"}, "blue object": {"color": "blue"},
                     "navy background": {"background_color": "navy"},
                     "gradient background": {"background": "gradient"}}


@dataclass
class StudyData:
    """What every encoder of a study is measured on (built once by ``study_data``)."""

    train: ShapesWorld
    test: ShapesWorld
    falcon_world: ShapesWorld
    falcon_image_embeddings: torch.Tensor  # toy-CLIP embeddings of falcon_world [N, d]
    caption_embeddings: torch.Tensor  # [M, d]
    captions: list[str]
    concept_sets: dict[str, list[torch.Tensor]]  # nuisance concept -> one sample [n, 3, S, S] per random set
    random_sets: list[torch.Tensor]


def _test_world(settings: StudySettings) -> ShapesWorld:
    """The held-out images every encoder is measured on (probe test set; the first n_explain are explained)."""
    return ShapesWorld(n=max(settings.n_test, settings.n_explain), size=32, seed=settings.seed, split="test")


def study_data(settings: StudySettings) -> StudyData:
    """The worlds, the toy-CLIP embeddings and the TCAV example sets of a study."""
    from course_utils.data.captions import load_caption_set
    from course_utils.vlm import caption_embeddings, load_toy_clip

    seed = settings.seed
    train = ShapesWorld(n=max(settings.n_train, 4_000), size=32, seed=seed, split="train")
    test = _test_world(settings)
    falcon_world = ShapesWorld(n=settings.falcon_probe, size=32, seed=seed, split="test", distractor_p=0.3)
    clip = load_toy_clip(checkpoint_dir() / "vlm" / "shapes-clip.pt")
    captions = load_caption_set()
    train_images = train.images.float() / 255
    generator = torch.Generator().manual_seed(seed)
    concept_sets = {}
    for name, rule in NUISANCE_CONCEPTS.items():
        pool = select_samples(train, **rule)
        if len(pool) < settings.tcav_examples:
            raise ValueError(f"only {len(pool)} training images show '{name}', fewer than tcav_examples = "
                             f"{settings.tcav_examples}: raise n_train or lower tcav_examples")
        concept_sets[name] = [train_images[pool[torch.randperm(len(pool), generator=generator)[:settings.tcav_examples]]]
                              for _ in range(settings.tcav_random_sets)]
    random_sets = [train_images[torch.randperm(len(train), generator=generator)[:settings.tcav_examples]]
                   for _ in range(settings.tcav_random_sets)]
    return StudyData(train, test, falcon_world, clip.encode_images(falcon_world.images.float() / 255),
                     caption_embeddings(clip, captions), captions, concept_sets, random_sets)


def baseline_values(test: ShapesWorld, settings: StudySettings) -> dict[str, dict[str, list[float]]]:
    """Per-image pointing-game hits and mask IoU [n_explain] of the random map and the centre prior on the
    explained test images."""
    from course_utils.metrics import centre_prior, mask_iou, pointing_hits, random_map

    masks = test.masks[:settings.n_explain]
    n = len(masks)
    maps = {"random map": random_map(n, 32, torch.Generator().manual_seed(settings.seed)),
            "centre prior": centre_prior(n, 32)}
    return {name: {"pointing game": pointing_hits(m, masks, settings.pg_tolerance).tolist(),
                   "mask IoU": mask_iou(m, masks).tolist()} for name, m in maps.items()}


def baseline_scores(test: ShapesWorld, settings: StudySettings) -> dict[str, dict[str, float]]:
    """Pointing game and mask IoU of the random map and the centre prior on the explained test images."""
    return {name: {metric: float(np.mean(v)) for metric, v in values.items()}
            for name, values in baseline_values(test, settings).items()}


def _saliency_maps(model: SimCLRModel, probe_model: nn.Module, head: nn.Module, images: torch.Tensor,
                   predicted: torch.Tensor, settings: StudySettings, device: torch.device) -> dict[str, torch.Tensor]:
    """Maps [B, 32, 32] of every saliency explainer for ``images`` (on ``device``)."""
    from course_utils.explain.agf import agf, class_target
    from course_utils.explain.gradcam import class_score, contrastive, feature, gradcam
    from course_utils.explain.relax import relax_batch

    encoder = model.encoder
    layer = getattr(encoder, settings.layer)
    views = SimCLRAugment(32)(images.cpu(), torch.Generator().manual_seed(settings.seed)).to(device)
    with torch.no_grad():
        top_feature = encoder(images).argmax(1)
    relaxed = relax_batch(encoder, images, settings.relax_masks, normalize=True,
                          generator=torch.Generator().manual_seed(settings.seed), progress=False)
    return {
        "Grad-CAM (probe class)": gradcam(probe_model, layer, images, class_score(predicted)),
        "Grad-CAM (contrastive)": gradcam(model, layer, images, contrastive(views, temperature=0.2)),
        "Grad-CAM (top feature)": gradcam(encoder, layer, images, feature(top_feature)),
        "RELAX": relaxed.importance.to(device),
        "AGF (probe class)": agf(encoder, images, class_target(head, predicted)),
    }


def gradcam_pointing(model: SimCLRModel, settings: StudySettings, device: torch.device | None = None,
                     test: ShapesWorld | None = None) -> dict[str, np.ndarray]:
    """Per-image pointing-game hits [n_explain] of the three Grad-CAM targets at ``settings.layer``, the probe
    fitted as in ``evaluate_encoder`` (same images, views and tolerance): the cheap part of the study for
    comparing layers (RELAX, AGF, FALCON and TCAV are not run)."""
    from course_utils.explain.gradcam import class_score, contrastive, feature, gradcam
    from course_utils.metrics import pointing_hits
    from course_utils.simclr import extract_features, linear_probe

    device = device or get_device()
    test = test if test is not None else _test_world(settings)
    model = copy.deepcopy(model).to(device).eval()
    encoder = model.encoder
    train = ShapesWorld(n=settings.n_train, size=32, seed=settings.seed, split="train")
    H_train, y_train = extract_features(encoder, train, device=device, progress=False)
    H_test, y_test = extract_features(encoder, test, device=device, progress=False)
    probe = linear_probe(H_train, y_train, H_test[:settings.n_test], y_test[:settings.n_test])
    probe_model = nn.Sequential(encoder, probe.classifier.to(device)).eval()
    images = (test.images[:settings.n_explain].float() / 255).to(device)
    masks = test.masks[:settings.n_explain]
    layer = getattr(encoder, settings.layer)
    views = SimCLRAugment(32)(images.cpu(), torch.Generator().manual_seed(settings.seed)).to(device)
    with torch.no_grad():
        predicted = probe_model(images).argmax(1)
        top_feature = encoder(images).argmax(1)
    maps = {"Grad-CAM (probe class)": gradcam(probe_model, layer, images, class_score(predicted)),
            "Grad-CAM (contrastive)": gradcam(model, layer, images, contrastive(views, temperature=0.2)),
            "Grad-CAM (top feature)": gradcam(encoder, layer, images, feature(top_feature))}
    return {name: pointing_hits(torch.nan_to_num(m.float()).cpu(), masks, settings.pg_tolerance).numpy()
            for name, m in maps.items()}


def _falcon_precision(H: torch.Tensor, data: StudyData) -> tuple[float, int]:
    """FALCON's P@1 over the explainable features of H [N, r] (nan when none is explainable)."""
    from course_utils.data.captions import concept_names
    from course_utils.explain import falcon

    world = data.falcon_world
    try:
        result = falcon.evaluate_features(H, data.falcon_image_embeddings, data.caption_embeddings, data.captions,
                                          world.attributes, world.attribute_names, concept_names(world.attribute_names),
                                          alpha=falcon.activation_threshold(H, 4.0), top_k=5, min_images=10,
                                          beta=0.7, max_low=50)
    except ValueError:  # no feature has enough highly activating images
        return float("nan"), 0
    return result.falcon["P@1"], int(result.falcon["features scored"])


def _tcav_nuisance_share(probe_model: nn.Module, layer: nn.Module, data: StudyData, settings: StudySettings,
                         device: torch.device) -> tuple[float, list[dict[str, Any]]]:
    """Share of (class, nuisance concept) pairs the probe's logit significantly uses: TCAV scores above the
    random CAVs' (one-sided), Benjamini–Hochberg at q = 0.05 across all pairs tested; and the pairs
    ({"class", "concept", "score", "random score", "p", "significant"}, the scores being means over the CAVs)."""
    from course_utils.explain.concepts import tcav_concepts
    from course_utils.stats import benjamini_hochberg

    test_images = data.test.images.float() / 255
    concepts = {name: [sample.to(device) for sample in samples] for name, samples in data.concept_sets.items()}
    random_sets = [r.to(device) for r in data.random_sets]
    pairs = []
    for c in range(settings.tcav_classes):
        inputs = test_images[(data.test.labels == c).nonzero().flatten()[:settings.tcav_inputs]].to(device)
        results = tcav_concepts(probe_model, layer, inputs, lambda out, c=c: out[:, c], concepts, random_sets)
        pairs.extend({"class": data.test.classes[c],
                      "concept": name, "score": r.score, "random score": float(np.mean(r.random_scores)),
                      "p": r.p_value} for name, r in results.items())
    significant = benjamini_hochberg([pair["p"] for pair in pairs], q=0.05)
    for pair, used in zip(pairs, significant):
        pair["significant"] = bool(used)
    return float(np.mean(significant)), pairs


def _score_maps(maps: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
                probabilities: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                settings: StudySettings) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Pointing game, mask IoU and deletion AUC (of ``probabilities`` for ``target``) of maps [B, H, W] on
    images [B, 3, H, W] with masks [B, H, W]: (the means, the per-image values)."""
    from course_utils.metrics import deletion_auc, mask_iou, pointing_hits

    maps = torch.nan_to_num(maps.float())
    values = {"pointing game": pointing_hits(maps.cpu(), masks, settings.pg_tolerance),
              "mask IoU": mask_iou(maps.cpu(), masks),
              "deletion AUC": deletion_auc(probabilities, images, maps, steps=settings.deletion_steps, target=target)}
    return ({metric: v.float().mean().item() for metric, v in values.items()},
            {metric: [round(x, 6) for x in v.float().cpu().tolist()] for metric, v in values.items()})


def evaluate_encoder(model: SimCLRModel, data: StudyData, settings: StudySettings,
                     device: torch.device | None = None) -> dict[str, Any]:
    """Probe accuracy and every interpretability measurement of one encoder.

    Returns:
        {"probe accuracy": float, "saliency": {explainer: {"pointing game", "mask IoU", "deletion AUC"}},
        "per image": {explainer: {"pointing game", "mask IoU", "deletion AUC"}: [n_explain] values, for
        intervals over images}, "FALCON P@1": float, "FALCON features": int, "TCAV nuisance share": float,
        "TCAV pairs": [{"class", "concept", "score", "random score", "p", "significant"}], "seconds": float}.
    """
    from course_utils.simclr import extract_features, linear_probe

    device = device or get_device()
    started = time.perf_counter()
    model = copy.deepcopy(model).to(device).eval()
    encoder = model.encoder
    train = ShapesWorld(n=settings.n_train, size=32, seed=settings.seed, split="train")
    H_train, y_train = extract_features(encoder, train, device=device, progress=False)
    H_test, y_test = extract_features(encoder, data.test, device=device, progress=False)
    probe = linear_probe(H_train, y_train, H_test[:settings.n_test], y_test[:settings.n_test])
    head = probe.classifier.to(device)
    probe_model = nn.Sequential(encoder, head).eval()

    images = (data.test.images[:settings.n_explain].float() / 255).to(device)
    masks = data.test.masks[:settings.n_explain]
    with torch.no_grad():
        predicted = probe_model(images).argmax(1)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return probe_model(x.to(device)).float().softmax(1)

    saliency: dict[str, dict[str, float]] = {}
    per_image: dict[str, dict[str, list[float]]] = {}
    for name, maps in _saliency_maps(model, probe_model, head, images, predicted, settings, device).items():
        saliency[name], per_image[name] = _score_maps(maps, images, masks, probabilities, predicted, settings)
    H_falcon, _ = extract_features(encoder, data.falcon_world, device=device, progress=False)
    p_at_1, n_features = _falcon_precision(H_falcon, data)
    nuisance, tcav_pairs = _tcav_nuisance_share(probe_model, getattr(encoder, settings.layer), data, settings, device)
    return {"probe accuracy": probe.accuracy, "saliency": saliency, "per image": per_image, "FALCON P@1": p_at_1,
            "FALCON features": n_features, "TCAV nuisance share": nuisance, "TCAV pairs": tcav_pairs,
            "seconds": time.perf_counter() - started}


def evaluate_protopnet(model: SimCLRModel, test: ShapesWorld, settings: StudySettings,
                       protopnet: ProtoPNetSettings, device: torch.device | None = None) -> dict[str, Any]:
    """The ProtoPNet point of one encoder (``ProtoPNetSettings``).

    Returns:
        {"accuracy": float, "correct": {"ProtoPNet": [n_test] 0/1, "linear probe": [n_test] 0/1} (the same
        test images, for a paired interval), "saliency": {"pointing game", "mask IoU", "deletion AUC"} means,
        "per image": the same [n_explain] values, "seconds": float}.  Deletion scores the ProtoPNet's own
        probability of its prediction.
    """
    from course_utils.explain.protopnet import ProtoPNet, evidence_maps, stage_features, train_protopnet
    from course_utils.simclr import linear_probe

    device = device or get_device()
    started = time.perf_counter()
    encoder = copy.deepcopy(model.encoder).to(device).eval()
    train = ShapesWorld(n=settings.n_train, size=32, seed=settings.seed, split="train")
    x_train, y_train = train.images.float() / 255, train.labels.long()
    x_test, y_test = test.images[:settings.n_test].float() / 255, test.labels[:settings.n_test].long()
    layers = sorted({protopnet.layer, "layer4"})
    features = {"train": stage_features(encoder, x_train, layers), "test": stage_features(encoder, x_test, layers)}
    with torch.no_grad():  # h = pool(layer4), the probe's input, from the same pass
        H = {split: encoder.pool(stages["layer4"].to(device)).cpu() for split, stages in features.items()}
    probe = linear_probe(H["train"], y_train, H["test"], y_test)
    torch.manual_seed(settings.seed)
    head = ProtoPNet(encoder, num_classes=len(train.classes), layer=protopnet.layer,
                     prototypes_per_class=protopnet.prototypes_per_class, seed=settings.seed).to(device)
    train_protopnet(head, x_train, y_train, warm_epochs=protopnet.warm_epochs,
                    last_layer_epochs=protopnet.last_layer_epochs, seed=settings.seed, progress=False,
                    features=features["train"][protopnet.layer])
    with torch.no_grad():
        predicted = torch.cat([head.head(f.to(device)).logits.argmax(1).cpu()
                               for f in features["test"][protopnet.layer].split(500)])
    images = x_test[:settings.n_explain].to(device)
    masks = test.masks[:settings.n_explain]
    maps = evidence_maps(head, images)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(x.to(device)).float().softmax(1)

    saliency, per_image = _score_maps(maps, images, masks, probabilities, predicted[:settings.n_explain].to(device),
                                      settings)
    return {"accuracy": float((predicted == y_test).float().mean()),
            "correct": {"ProtoPNet": (predicted == y_test).int().tolist(),
                        "linear probe": (probe.predictions == y_test).int().tolist()},
            "saliency": saliency, "per image": per_image, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------
# The whole study, cached per encoder
# --------------------------------------------------------------------------

# Raised whenever what is measured changes without a change of settings or version, so that no cached
# measurement of the old protocol is reused. 2: TCAV draws one concept sample per random set.
# 3: concept activation vectors from the exact logistic-regression solver (equal to scikit-learn's).
MEASUREMENT_PROTOCOL = 3


def _cache_key(spec: EncoderSpec, grid: str, settings: StudySettings) -> str:
    from course_utils import __version__

    path = checkpoint_path(spec, grid)
    weights = verify_checksum(path) if path is not None else f"untrained seed {settings.seed}"
    text = json.dumps([asdict(spec), asdict(settings), weights, __version__, MEASUREMENT_PROTOCOL], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """JSON-safe copy: nan -> None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class StudyResult:
    """The measurements of a grid.

    Attributes:
        rows: one dict per (encoder, explainer): encoder, factor, probe accuracy, explainer, and the
            explainer's measurements (pointing game / mask IoU / deletion AUC, or FALCON P@1, or TCAV
            nuisance share); missing measurements are None.
        baselines: pointing game and mask IoU of the random map and the centre prior.
        settings: the StudySettings used.
        missing: encoders of the grid that are not trained (with the command that trains them).
        per_image: encoder -> explainer -> measure -> the values on each explained image (the same
            ``n_explain`` test images for every encoder and baseline, so differences are paired); the
            baselines appear as encoders "random map" and "centre prior" with explainer "baseline".
        tcav_pairs: encoder -> the (class, nuisance concept) pairs behind its TCAV nuisance share.
        correct: encoder -> {"ProtoPNet", "linear probe"} -> 0/1 per test image (the same ``n_test``
            images), for the paired accuracy difference of the interpretable-by-design head.
    """

    rows: list[dict[str, Any]]
    baselines: dict[str, dict[str, float]]
    settings: StudySettings
    missing: list[str] = field(default_factory=list)
    per_image: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    tcav_pairs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    correct: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def values(self, encoder: str, explainer: str, measure: str) -> np.ndarray:
        """Per-image values [n_explain] of one encoder's explainer (or of a baseline: explainer "baseline"),
        for ``stats.mean_interval`` / ``stats.difference_interval``.

        Raises:
            KeyError: not measured per image (measurements cached by an older version).
        """
        return np.asarray(self.per_image[encoder][explainer][measure], dtype=float)


def _rows(spec: EncoderSpec, measured: dict[str, Any], protopnet: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one encoder: its post-hoc explainers (``evaluate_encoder``), then its ProtoPNet
    (``evaluate_protopnet``), whose row also carries the head's own test accuracy as "model accuracy"."""
    common = {"encoder": spec.name, "factor": spec.factor, "probe accuracy": measured["probe accuracy"]}
    rows = [{**common, "explainer": name, **scores} for name, scores in measured["saliency"].items()]
    rows.append({**common, "explainer": "FALCON", "concept P@1": measured["FALCON P@1"],
                 "features explained": measured["FALCON features"]})
    rows.append({**common, "explainer": "TCAV", "nuisance share": measured["TCAV nuisance share"]})
    rows.append({**common, "explainer": PROTOPNET, **protopnet["saliency"], "model accuracy": protopnet["accuracy"]})
    return rows


def committed_results_dir() -> Path:
    """``data/study``: measurements committed with the course (the cpu grid at ``FULL`` settings), so that
    notebook 08 opens in seconds on a fresh clone.  A file is used only when its name carries the same
    key as a fresh measurement would (checkpoint sha256, settings, course_utils version)."""
    return checkpoint_dir().parent / "study"


def result_file(spec: EncoderSpec, grid: str, settings: StudySettings,
                protopnet: ProtoPNetSettings | None = None) -> str:
    """The file name of one encoder's measurements, keyed by checkpoint and settings; with ``protopnet``,
    that of its ProtoPNet point (keyed by both settings)."""
    key = _cache_key(spec, grid, settings)
    if protopnet is None:
        return f"{grid}-{spec.name}-{key}.json"
    key = hashlib.sha256(json.dumps([key, asdict(protopnet)], sort_keys=True).encode()).hexdigest()[:16]
    return f"{grid}-{spec.name}-protopnet-{key}.json"


def measurement_files(grid: str, settings: StudySettings, encoders: Sequence[str] | None = None) -> list[str]:
    """The file names of the measurements of ``grid`` (or its named ``encoders``) at ``settings``: per encoder,
    its post-hoc measurements and its ProtoPNet point (``PROTOPNET_QUICK`` with ``QUICK``, else
    ``PROTOPNET_FULL``)."""
    protopnet = PROTOPNET_QUICK if settings == QUICK else PROTOPNET_FULL
    return [result_file(spec, grid, settings, part) for spec in select_encoders(grid, encoders)
            for part in (None, protopnet)]


def _measured(cache_file: Path, cache: bool, measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """A measurement read from the cache (or the committed copy) or made now and cached; and its source."""
    stored = [f for f in (cache_file, committed_results_dir() / cache_file.name) if cache and f.is_file()]
    if stored:
        return json.loads(stored[0].read_text()), "cached" if stored[0] == cache_file else "committed"
    measured = measure()
    atomic_write(cache_file, lambda f: f.write(json.dumps(_plain(measured), indent=1).encode()))
    return measured, f"{measured['seconds']:.0f} s"


def run_study(grid: str = "cpu", settings: StudySettings | None = None, device: torch.device | None = None,
              cache: bool = True, progress: bool = True, encoders: Sequence[str] | None = None,
              protopnet: ProtoPNetSettings | None = None) -> StudyResult:
    """Measure every trained encoder of ``grid`` (or the named ``encoders`` of it), cached in
    ``<data root>/study/cache``; with ``cache``, committed measurements (``committed_results_dir``) with the
    same key are read too.  Each encoder's ProtoPNet point (``protopnet``, default ``PROTOPNET_FULL`` or
    ``PROTOPNET_QUICK`` with the settings) is measured and cached apart.

    Encoders that are not trained are listed in ``missing`` (never trained silently: that takes minutes
    to hours; ``python -m course_utils.study --train`` does it).
    """
    specs = select_encoders(grid, encoders)
    settings = settings or (QUICK if quick_mode() else FULL)
    protopnet = protopnet or (PROTOPNET_QUICK if settings == QUICK else PROTOPNET_FULL)
    device = device or get_device()
    cache_dir = default_data_root() / "study" / "cache"
    data: StudyData | None = None
    test = _test_world(settings)
    rows, missing, per_image, tcav_pairs, correct = [], [], {}, {}, {}
    for spec in specs:
        path = checkpoint_path(spec, grid)
        if path is not None and not path.is_file():
            missing.append(spec.name)
            continue

        def measure_encoder() -> dict[str, Any]:
            nonlocal data
            data = data or study_data(settings)
            return evaluate_encoder(load_encoder(spec, grid, settings.seed), data, settings, device)

        measured, source = _measured(cache_dir / result_file(spec, grid, settings), cache, measure_encoder)
        proto, proto_source = _measured(
            cache_dir / result_file(spec, grid, settings, protopnet), cache,
            lambda: evaluate_protopnet(load_encoder(spec, grid, settings.seed), test, settings, protopnet, device))
        if progress:
            print(f"{spec.name:<20} probe {measured['probe accuracy']:.1%}  ({source}); "
                  f"ProtoPNet {proto['accuracy']:.1%}  ({proto_source})", flush=True)
        rows.extend(_rows(spec, measured, proto))
        per_image[spec.name] = {**measured.get("per image", {}), PROTOPNET: proto["per image"]}
        correct[spec.name] = proto["correct"]
        if "TCAV pairs" in measured:
            tcav_pairs[spec.name] = measured["TCAV pairs"]
    baselines = baseline_values(test, settings)
    per_image.update({name: {"baseline": values} for name, values in baselines.items()})
    return StudyResult([_plain(r) for r in rows], baseline_scores(test, settings), settings, missing, per_image,
                       tcav_pairs, correct)


# --------------------------------------------------------------------------
# The closing figure
# --------------------------------------------------------------------------

def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> "stats.SpearmanTest | None":
    """Spearman's ρ of paired values with its exact (n ≤ 8) or permutation p-value (``stats.spearman_test``),
    over the pairs where both values are measured (None or nan skipped).

    Returns:
        the test (``.rho``, ``.p``, ``.n``), or None when fewer than 3 pairs remain or one side is constant
        (ρ undefined).
    """
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)]
    if len(pairs) < 3:
        return None
    a, b = map(np.asarray, zip(*pairs))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return stats.spearman_test(a, b)


PANELS = [("pointing game", SALIENCY_EXPLAINERS, +1), ("mask IoU", SALIENCY_EXPLAINERS, +1),
          ("deletion AUC", SALIENCY_EXPLAINERS, -1), ("concept P@1", ["FALCON"], +1), ("nuisance share", ["TCAV"], -1)]
EXPLAINER_ROWS = SALIENCY_EXPLAINERS + ["FALCON", "TCAV"]
SEED_FACTOR = "seed"


def seed_encoders(result: StudyResult) -> list[str]:
    """The measured encoders of the base recipe: the base and its "seed" repeats (other training seeds)."""
    factors = dict((r["encoder"], r["factor"]) for r in result.rows)
    return [name for name, factor in factors.items() if factor in ("base", SEED_FACTOR)]


def recipes(result: StudyResult, seeds: str = "mean") -> StudyResult:
    """One encoder per training recipe, so that repeats of the base recipe do not count as extra encoders
    in a correlation across encoders.

    Args:
        seeds: "mean": the base's rows become the mean over the base and its seed repeats (every measure and
            the probe accuracy; None where any seed lacks it); "exclude": the seed repeats are dropped and
            the base keeps its own (seed 0) values; "keep": the result unchanged.
    """
    if seeds == "keep":
        return result
    if seeds not in ("mean", "exclude"):
        raise ValueError(f"seeds must be 'mean', 'exclude' or 'keep', got {seeds!r}")
    replicas = seed_encoders(result)
    rows = [r for r in result.rows if r["factor"] != SEED_FACTOR]
    if seeds == "mean" and len(replicas) > 1:
        base = next(r["encoder"] for r in result.rows if r["factor"] == "base")
        averaged = []
        for r in rows:
            if r["encoder"] != base:
                averaged.append(r)
                continue
            same = [q for q in result.rows if q["encoder"] in replicas and q["explainer"] == r["explainer"]]
            mean = dict(r)
            for key, value in r.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values = [q.get(key) for q in same]
                    mean[key] = None if any(v is None for v in values) else float(np.mean(values))
            averaged.append(mean)
        rows = averaged
    repeats = {r["encoder"] for r in result.rows if r["factor"] == SEED_FACTOR}
    per_image = {k: v for k, v in result.per_image.items() if k not in repeats}
    return StudyResult(rows, result.baselines, result.settings, result.missing, per_image,
                       {k: v for k, v in result.tcav_pairs.items() if k not in repeats},
                       {k: v for k, v in result.correct.items() if k not in repeats})


@dataclass(frozen=True)
class Correlations:
    """Signed Spearman tests between probe accuracy and each explainer's measures across encoders.

    Attributes:
        tests: (explainer, measure) -> the ``stats.SpearmanTest`` of probe accuracy against the measure,
            signed so that ρ > 0 means *explanations improve with accuracy* (the measure is negated where
            lower is better: deletion AUC, nuisance share; the p-value is two-sided, so unchanged), or None
            where ρ is undefined.
    """

    tests: dict[tuple[str, str], "stats.SpearmanTest | None"]

    def _grid(self, attribute: str) -> np.ndarray:
        grid = np.full((len(EXPLAINER_ROWS), 3), np.nan)
        for (explainer, measure), test in self.tests.items():
            if test is not None:
                grid[EXPLAINER_ROWS.index(explainer), _column(measure)] = getattr(test, attribute)
        return grid

    @property
    def rho(self) -> np.ndarray:
        """float [len(EXPLAINER_ROWS), 3]: columns pointing game (FALCON: P@1, TCAV: nuisance share), mask IoU,
        deletion AUC; nan where not measured or constant."""
        return self._grid("rho")

    @property
    def p(self) -> np.ndarray:
        """The two-sided p-values, laid out as ``rho``."""
        return self._grid("p")

    @property
    def n(self) -> np.ndarray:
        """The number of encoders of each test, laid out as ``rho``."""
        return self._grid("n")

    def significant(self, level: float = 0.05) -> list[tuple[str, str]]:
        """The (explainer, measure) pairs whose correlation has p < ``level``."""
        return [key for key, test in self.tests.items() if test is not None and test.p < level]


def _column(measure: str) -> int:
    return {"mask IoU": 1, "deletion AUC": 2}.get(measure, 0)


def improvement_correlations(result: StudyResult, exclude: Sequence[str] = (), seeds: str = "mean") -> Correlations:
    """Spearman ρ (with its exact/permutation p-value, ``stats.spearman_test``) between probe accuracy and
    each explainer's measures across the encoders, signed so that ρ > 0 means *explanations improve with
    accuracy*.

    Args:
        exclude: encoders left out (e.g. the untrained reference, which would set the ranks alone).
        seeds: how the seed repeats of the base recipe enter (``recipes``): by default the base is the mean
            over its seeds, so each recipe is one point.
    """
    result = recipes(result, seeds)
    tests = {}
    for metric, explainers, sign in PANELS:
        for explainer in explainers:
            kept = [r for r in result.rows if r["explainer"] == explainer and r["encoder"] not in exclude]
            tests[(explainer, metric)] = spearman(
                [r["probe accuracy"] for r in kept],
                [None if r.get(metric) is None else sign * r[metric] for r in kept])
    return Correlations(tests)


def measure_table(result: StudyResult) -> "pd.DataFrame":
    """One row per encoder, one column per headline measure: probe accuracy, the pointing game of each saliency
    explainer ("PG <explainer>"), "FALCON P@1", "TCAV nuisance share", "ProtoPNet accuracy" and "PG ProtoPNet"
    (nan where not measured)."""
    import pandas as pd

    table: dict[str, dict[str, float]] = {}
    for r in result.rows:
        row = table.setdefault(r["encoder"], {"probe accuracy": r["probe accuracy"]})
        if r["explainer"] == "FALCON":
            row["FALCON P@1"] = r.get("concept P@1")
        elif r["explainer"] == "TCAV":
            row["TCAV nuisance share"] = r.get("nuisance share")
        elif r["explainer"] == PROTOPNET:
            row["ProtoPNet accuracy"] = r.get("model accuracy")
            row["PG ProtoPNet"] = r.get("pointing game")
        else:
            row[f"PG {r['explainer']}"] = r.get("pointing game")
    return pd.DataFrame.from_dict(table, orient="index").astype(float)


def seed_spread(result: StudyResult) -> "pd.Series":
    """Seed-to-seed spread of the base recipe: for every column of ``measure_table``, the largest difference
    (max − min) between the base and its seed repeats (nan with fewer than two of them measured)."""
    values = measure_table(result).loc[seed_encoders(result)]
    spread = values.max() - values.min()
    return spread if len(values) >= 2 else spread * np.nan


def factor_effects(result: StudyResult, references: dict[str, str]) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """The change of every ``measure_table`` column when one factor changes, and whether it exceeds the seed
    spread of the base recipe.

    Args:
        references: encoder -> the encoder it differs from in one factor (pairs with a missing encoder are
            skipped).
    Returns:
        (deltas, exceeds): both indexed "reference → encoder" with columns "Δ <measure>"; ``exceeds`` is True
        where |Δ| > the seed spread of that measure (False where the spread is unknown).
    """
    import pandas as pd

    table, spread = measure_table(result), seed_spread(result)
    deltas, exceeds = {}, {}
    for encoder, reference in references.items():
        if encoder in table.index and reference in table.index:
            delta = table.loc[encoder] - table.loc[reference]
            deltas[f"{reference} → {encoder}"] = delta
            exceeds[f"{reference} → {encoder}"] = delta.abs() > spread
    deltas_frame = pd.DataFrame.from_dict(deltas, orient="index").add_prefix("Δ ")
    exceeds_frame = pd.DataFrame.from_dict(exceeds, orient="index").add_prefix("Δ ").fillna(False).astype(bool)
    return deltas_frame, exceeds_frame


def tradeoff_figure(result: StudyResult, exclude: Sequence[str] = (), seeds: str = "mean") -> tuple[Any, np.ndarray]:
    """Interpretability vs performance: one point per encoder (marker) and explainer (colour) in each panel
    (x: linear-probe accuracy, y: an explanation-quality measure on ground truth; the seed repeats of the base
    appear as their own points; each encoder's ProtoPNet at its own accuracy, a line linking it to the same
    encoder's probe accuracy), the baselines as grey lines, and a last panel with
    ``improvement_correlations``: each cell's signed ρ, its p-value and, in the title, the number of encoders
    (bold: p < 0.05).

    Args:
        exclude: encoders left out of the ρ panel (e.g. the untrained reference, which sets the ranks alone).
        seeds: how the base's seed repeats enter the ρ panel (``recipes``; default: their mean is one point).
    Returns:
        (fig, axes [2, 3]).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 3, figsize=(16, 10))
    encoders = list(dict.fromkeys(r["encoder"] for r in result.rows))
    markers = dict(zip(encoders, "osD^vP*Xhp<>"))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate([*EXPLAINER_ROWS, PROTOPNET])}
    for ax, (metric, explainers, sign) in zip(axes.flat, PANELS):
        for explainer in explainers:
            for r in result.rows:
                if r["explainer"] == explainer and r.get(metric) is not None:
                    ax.scatter(r["probe accuracy"], r[metric], color=colours[explainer],
                               marker=markers[r["encoder"]], s=60, alpha=0.85, edgecolor="black", linewidth=0.4)
        for r in result.rows:  # the interpretable-by-design head at its own accuracy, linked to its encoder's probe
            if explainers is SALIENCY_EXPLAINERS and r["explainer"] == PROTOPNET and r.get(metric) is not None:
                ax.plot([r["probe accuracy"], r["model accuracy"]], [r[metric]] * 2, color=colours[PROTOPNET],
                        lw=0.8, alpha=0.6)
                ax.scatter(r["model accuracy"], r[metric], color=colours[PROTOPNET], marker=markers[r["encoder"]],
                           s=70, alpha=0.9, edgecolor="black", linewidth=1.2)
        if metric in ("pointing game", "mask IoU"):
            for name, style in (("random map", ":"), ("centre prior", "--")):
                ax.axhline(result.baselines[name][metric], color="gray", ls=style, lw=1)
        ax.set_xlabel("test accuracy: linear probe (ProtoPNet: its own)" if explainers is SALIENCY_EXPLAINERS
                      else "linear-probe accuracy (performance)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} ({'higher' if sign > 0 else 'lower'} is better)")
    ax = axes[1, 2]
    correlations = improvement_correlations(result, exclude, seeds)
    rho, p, n = correlations.rho, correlations.p, correlations.n
    image = ax.imshow(rho, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_yticks(range(len(EXPLAINER_ROWS)), [*SALIENCY_EXPLAINERS, "FALCON (P@1)", "TCAV (nuisance share)"],
                  fontsize=8)
    ax.set_xticks(range(3), ["pointing game\n/ P@1 / share", "mask IoU", "deletion AUC"], fontsize=8)
    counts = sorted({int(k) for k in n[np.isfinite(n)]})
    for (i, j), value in np.ndenumerate(rho):
        if np.isfinite(value):
            label = f"{value:+.2f}\np = {p[i, j]:.2f}" + (f", n = {int(n[i, j])}" if len(counts) > 1 else "")
            ax.text(j, i, label, ha="center", va="center", fontsize=8,
                    fontweight="bold" if p[i, j] < 0.05 else "normal")
    fig.colorbar(image, ax=ax, label="Spearman ρ, signed: > 0 = explanations improve with accuracy")
    encoders_text = f"{counts[0]} encoders" if len(counts) == 1 else "n encoders per cell"
    kind = "exact" if all(t.exact for t in correlations.tests.values() if t is not None) else "permutation"
    ax.set_title(f"Does better performance go with better explanations?\nρ over {encoders_text}; "
                 f"{kind} p (bold: p < 0.05)", fontsize=10)
    handles = [Line2D([], [], ls="", marker="o", markersize=8, color=colours[e], label=e) for e in EXPLAINER_ROWS]
    handles.append(Line2D([], [], marker="o", markersize=8, color=colours[PROTOPNET], markeredgecolor="black",
                          lw=0.8, label=f"{PROTOPNET}: at its own accuracy, — to its encoder's probe"))
    handles += [Line2D([], [], color="gray", ls=":", label="baseline: random map"),
                Line2D([], [], color="gray", ls="--", label="baseline: centre prior")]
    handles += [Line2D([], [], ls="", marker=markers[e], markersize=8, color="white", markeredgecolor="black",
                       label=e) for e in encoders]
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    return fig, axes


def format_table(result: StudyResult) -> str:
    """A plain-text table: one line per encoder, pointing game per saliency explainer, FALCON, TCAV."""
    encoders = list(dict.fromkeys(r["encoder"] for r in result.rows))
    short = {"Grad-CAM (probe class)": "GC-probe", "Grad-CAM (contrastive)": "GC-contr", "Grad-CAM (top feature)":
             "GC-feat", "RELAX": "RELAX", "AGF (probe class)": "AGF"}
    header = f"{'encoder':<20}{'factor':<24}{'probe':>7}" + "".join(f"{v:>10}" for v in short.values()) + \
        f"{'FALCON':>8}{'TCAV':>7}"
    lines = [header, "(pointing game per explainer; FALCON concept P@1; TCAV share of nuisance concepts significant)"]

    def fmt(v: Any, width: int) -> str:
        return f"{v:>{width}.2f}" if v is not None else f"{'–':>{width}}"

    for encoder in encoders:
        rows = {r["explainer"]: r for r in result.rows if r["encoder"] == encoder}
        first = next(iter(rows.values()))
        values = [rows[e]["pointing game"] for e in short]
        lines.append(f"{encoder:<20}{first['factor']:<24}{first['probe accuracy']:>7.1%}"
                     + "".join(fmt(v, 10) for v in values)
                     + fmt(rows["FALCON"]["concept P@1"], 8) + fmt(rows["TCAV"]["nuisance share"], 7))
    for name, scores in result.baselines.items():
        lines.append(f"baseline {name}: pointing game {scores['pointing game']:.2f}, mask IoU {scores['mask IoU']:.2f}")
    return "\n".join(lines)


def markdown_table(result: StudyResult) -> str:
    """The README's table of the study: one row per encoder (probe accuracy, pointing game per saliency
    explainer, FALCON P@1 with its number of features, TCAV nuisance share, the ProtoPNet's accuracy with
    its prototype maps' pointing game) and the baselines' row.
    Printed by ``python -m course_utils.study --markdown``; a test keeps the README's copy equal to it."""
    header = ["encoder", "factor", "probe", *(f"PG {e}" for e in SALIENCY_EXPLAINERS), "FALCON P@1 (features)",
              "TCAV nuisance share", "ProtoPNet accuracy (PG)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value: Any) -> str:
        return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.2f}"

    for encoder in dict.fromkeys(r["encoder"] for r in result.rows):
        rows = {r["explainer"]: r for r in result.rows if r["encoder"] == encoder}
        first, falcon = next(iter(rows.values())), rows["FALCON"]
        cells = [encoder, first["factor"], f"{100 * first['probe accuracy']:.1f} %",
                 *(fmt(rows[e]["pointing game"]) for e in SALIENCY_EXPLAINERS),
                 f"{fmt(falcon['concept P@1'])} ({falcon['features explained']:.0f})", fmt(rows["TCAV"]["nuisance share"]),
                 f"{100 * rows[PROTOPNET]['model accuracy']:.1f} % ({fmt(rows[PROTOPNET]['pointing game'])})"]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = " / ".join(f"{scores['pointing game']:.2f}" for scores in result.baselines.values())
    lines.append(f"| baselines: {' / '.join(result.baselines)} | | | {baselines} |" + " |" * (len(header) - 4))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The interpretability-vs-performance study (notebook 08).")
    parser.add_argument("--grid", default="cpu", choices=sorted(GRIDS))
    parser.add_argument("--train", action="store_true", help="train the grid's missing encoders first")
    parser.add_argument("--only-train", action="store_true", help="train the missing encoders, measure nothing")
    parser.add_argument("--retrain", action="store_true", help="with --train: retrain encoders that exist")
    parser.add_argument("--encoders", nargs="+", metavar="NAME", help="only these encoders of the grid")
    parser.add_argument("--quick", action="store_true", help="small settings (as COURSE_QUICK=1)")
    parser.add_argument("--out", type=Path, help="also write the rows and baselines as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print the README's table of the results")
    parser.add_argument("--commit", action="store_true",
                        help="also copy the measurements into data/study (committed with the course)")
    args = parser.parse_args(argv)
    try:
        specs = select_encoders(args.grid, args.encoders)
    except ValueError as error:
        parser.error(str(error))
    device = get_device()
    if args.train or args.only_train:
        for spec in specs:
            path = checkpoint_path(spec, args.grid)
            if path is None or spec.checkpoint is not None or (path.is_file() and not args.retrain):
                continue
            print(f"training {spec.name} ({spec.factor}) on {device} -> {path}", flush=True)
            train_encoder(spec, args.grid, device, progress=False)
            print(f"  done: {json.dumps(load_checkpoint(path).metadata.get('train_minutes'))} min", flush=True)
    if args.only_train:
        return
    settings = QUICK if args.quick or quick_mode() else FULL
    result = run_study(args.grid, settings, device, encoders=args.encoders)
    print(format_table(result))
    if args.markdown:
        print(markdown_table(result))
    if args.commit:
        cache_dir = default_data_root() / "study" / "cache"
        for measured in [cache_dir / name for name in measurement_files(args.grid, settings, args.encoders)]:
            if measured.is_file():
                target = committed_results_dir() / measured.name
                atomic_write(target, lambda f: f.write(measured.read_bytes()))
                print(f"committed: {target}")
    if result.missing:
        print(f"not trained yet (run with --train): {', '.join(result.missing)}")
    if args.out:
        atomic_write(Path(args.out), lambda f: f.write(json.dumps(
            {"grid": args.grid, "settings": asdict(settings), "rows": result.rows, "baselines": result.baselines,
             "missing": result.missing}, indent=1).encode()))


if __name__ == "__main__":
    main()
