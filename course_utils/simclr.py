"""SimCLR: the NT-Xent loss, a fast training loop that scales out with torchrun,
and the frozen-feature evaluations (linear probe, k-NN).

Training keeps the whole data set on the device as uint8 and builds both views
with the batched ``SimCLRAugment``; forward passes run under bf16 autocast and
channels_last where the hardware supports it.  Under ``torchrun`` the same
function trains with DistributedDataParallel (gloo on CPU, nccl on GPU), and the
loss gathers the negatives of every process, so N processes compute the loss of
one process on the concatenated batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.data.augment import SimCLRAugment
from course_utils.inputs import check_features
from course_utils.models import SimCLRModel, build_model, save_checkpoint
from course_utils.runtime import autocast, eval_mode, get_device


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent loss of two views, averaged over all 2B anchors.

    ``l(i, j) = -log exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)`` with cosine
    similarity.  Under torch.distributed the candidates (positives and negatives) are gathered
    from every process with gradient, so the loss equals the single-process loss of the
    concatenated batch (each process averages over its own anchors; DDP averages gradients).

    Args:
        z1, z2: [B, D] projections of the two views (unnormalised); row i of each is one image.
        temperature: t > 0.
    Returns:
        scalar float32 tensor.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs z1, z2 of equal shape [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise ValueError("nt_xent needs at least one pair")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    batch = z1.shape[0]
    if _distributed():
        from torch.distributed.nn.functional import all_gather

        world, rank = dist.get_world_size(), dist.get_rank()
        all1, all2 = torch.cat(all_gather(z1)), torch.cat(all_gather(z2))
    else:
        world, rank, all1, all2 = 1, 0, z1, z2
    candidates = torch.cat([all1, all2])  # [2 B N, D]
    anchors = torch.cat([z1, z2])  # [2 B, D]
    logits = anchors @ candidates.T / temperature  # [2 B, 2 B N]
    local = torch.arange(batch, device=z1.device) + rank * batch
    half = batch * world
    self_index = torch.cat([local, local + half])
    positive = torch.cat([local + half, local])
    logits[torch.arange(2 * batch, device=z1.device), self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


@dataclass
class TrainHistory:
    """Per-epoch training record (lists of equal length, one entry per epoch)."""

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    pairs_per_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    knn: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.__dict__.items()}


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of steps, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _epoch_indices(n: int, epoch: int, seed: int, batch_size: int) -> torch.Tensor:
    """This process's shuffled sample indices for one epoch (DistributedSampler semantics), [steps, B]."""
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=dist.get_world_size() if _distributed() else 1,
        rank=dist.get_rank() if _distributed() else 0, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler))
    steps = len(indices) // batch_size
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(indices)} images per process; "
                         "use a smaller batch or more data")
    return indices[: steps * batch_size].view(steps, batch_size)


def _dataset_images(dataset: Any) -> torch.Tensor:
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("train_simclr needs a data set with .images uint8 [N, 3, H, W] "
                         "(ShapesWorld or load_dataset(...)); got " + type(dataset).__name__)
    return images


TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "history", "epoch", "config")


class TrainingStateError(ValueError):
    """A training-state file that cannot be read: truncated (killed while copying), corrupt or foreign."""


def read_training_state(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a training-state file written by ``train_simclr(checkpoint=...)``.

    Returns:
        the state dict (model, optimizer, scheduler, history, epoch (0-based, last finished), config,
        metadata, run).
    Raises:
        FileNotFoundError if it does not exist; TrainingStateError (a ValueError) naming the file when
        it is truncated, corrupt or not a training state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged zip
        raise TrainingStateError(f"the training state {path} is truncated or corrupt and cannot be read "
                                 f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                                 ) from error
    missing = [k for k in TRAINING_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainingStateError(f"{path} is not a training state of train_simclr (missing {', '.join(missing)})")
    return state


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training state: ``<path>.tmp`` first, then ``os.replace``.

    A temp file left behind by a save that was killed (``<path>.tmp``, or ``.<name>.*.tmp`` of older
    versions) is removed first, so interrupted runs do not accumulate half-written copies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    for stale in [tmp, *path.parent.glob(f".{path.name}.*.tmp")]:
        stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def train_simclr(
    model: SimCLRModel,
    dataset: Any,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.5,
    weight_decay: float = 1e-4,
    warmup_fraction: float = 0.03,
    augment: SimCLRAugment | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    knn_data: tuple[Any, Any] | None = None,
    callback: Callable[[int, TrainHistory], None] | None = None,
    progress: bool = True,
    channels_last: bool = True,
    metadata: dict[str, Any] | None = None,
    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainHistory:
    """Train ``model`` with SimCLR on ``dataset.images``; returns the per-epoch history.

    Args:
        model: SimCLRModel (encoder + projector); trained in place.
        dataset: anything with ``.images`` uint8 [N, 3, H, W] (ShapesWorld, ImageTensorDataset).
        epochs: total number of epochs (also when resuming).
        batch_size: images per step and process; each gives two views.
        lr, weight_decay: AdamW; ``lr`` is scaled by nothing (set it for the global batch).
        temperature: NT-Xent temperature.
        warmup_fraction: share of the steps with linear warm-up before the cosine decay.
        augment: the view generator (default ``SimCLRAugment(image side)``).
        seed: the randomness of epoch e depends only on (seed, e, rank), so a resumed run
            repeats an uninterrupted one.
        checkpoint: training-state file written atomically after each epoch (model, optimizer,
            history); with ``resume=True`` training continues from it when it exists.
        knn_data: optional (train, test) data sets for a k-NN accuracy after each epoch.
        callback: called as ``callback(epoch, history)`` after each epoch (live plots).
        channels_last: train in the channels_last memory format (faster convolutions); ignored by CPU
            processes under torchrun, where DDP over gloo crashes with channels_last parameters.
        metadata: plain values stored with the checkpoint (e.g. the command that trained it).
        penalty: optional regulariser added to the loss, ``penalty(h)`` of the representations of both
            views float32 [2B, r] (e.g. the Q-Score penalty of notebook 04); the history's loss includes it.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    images = _dataset_images(dataset)
    device = torch.device(device) if device is not None else get_device()
    rank = dist.get_rank() if _distributed() else 0
    if _distributed() and device.type == "cuda" and device.index is None:  # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    images = images.to(device)
    augment = augment or SimCLRAugment(images.shape[-1])
    if _distributed() and device.type == "cpu":
        # DistributedDataParallel over gloo crashes in backward (double free) when the parameters are
        # channels_last (torch 2.14.1, measured); the CPU replicas therefore stay contiguous.
        channels_last = False
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device).to(memory_format=memory_format)
    net: nn.Module = model
    if _distributed():
        # Batch-norm statistics are synchronised across GPUs; PyTorch's SyncBatchNorm has no CPU
        # kernel, so CPU processes keep per-process statistics (the loss itself is exact).
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = _epoch_indices(images.shape[0], 0, seed, batch_size).shape[0]
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total_steps, warmup_fraction))
    world = dist.get_world_size() if _distributed() else 1
    run = {"config": model.config, "seed": seed, "batch_size": batch_size, "world_size": world,
           "epochs": epochs, "steps_per_epoch": steps_per_epoch, "lr": lr, "temperature": temperature}
    history, start_epoch = TrainHistory(), 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state = read_training_state(checkpoint, map_location=device)
        stored = state.get("run", {})
        different = {k: (stored.get(k), v) for k, v in run.items() if stored.get(k) != v}
        if different:
            raise ValueError(f"cannot resume from {checkpoint}: it was written by a different run "
                             f"(stored vs now: {different}); delete it or resume with the same settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = TrainHistory(**state["history"])
        start_epoch = int(state["epoch"]) + 1
    for epoch in range(start_epoch, epochs):
        net.train()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
        batches = _epoch_indices(images.shape[0], epoch, seed, batch_size)
        started, losses = time.perf_counter(), []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress or rank != 0, leave=False)
        for index in bar:
            x = images[index.to(device)].float().div_(255)
            views = torch.cat([augment(x, generator), augment(x, generator)])
            views = views.contiguous(memory_format=memory_format)
            with autocast(device):
                h, z = net(views)
            z1, z2 = z.float().chunk(2)
            loss = nt_xent(z1, z2, temperature)
            if penalty is not None:
                loss = loss + penalty(h.float())
            mean_loss = loss.detach().clone()
            if _distributed():  # every process sees the global mean, so all of them stop together
                dist.all_reduce(mean_loss)
                mean_loss /= world
            if not torch.isfinite(mean_loss):
                raise FloatingPointError(f"SimCLR loss became {mean_loss.item()} at epoch {epoch}; lower lr "
                                         f"(now {scheduler.get_last_lr()[0]:.2e}) or raise the temperature")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            losses.append(mean_loss.item())
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_s=f"{len(losses) * batch_size / elapsed:.0f}")
        seconds = time.perf_counter() - started
        knn = None
        if knn_data is not None and rank == 0:
            train_feats = extract_features(model.encoder, knn_data[0], device=device, progress=False)
            test_feats = extract_features(model.encoder, knn_data[1], device=device, progress=False)
            knn = knn_accuracy(*train_feats, *test_feats)
        history.epoch.append(epoch + 1)
        history.loss.append(float(np.mean(losses)))
        history.lr.append(float(last_lr))
        history.pairs_per_s.append(len(losses) * batch_size * world / seconds)
        history.seconds.append(seconds)
        history.knn.append(knn)
        if checkpoint is not None and rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "history": history.as_dict(), "epoch": epoch,
                     "config": model.config, "metadata": metadata or {}, "run": run}
            save_training_state(checkpoint, state)
        if callback is not None:
            callback(epoch + 1, history)
    model.to(memory_format=torch.contiguous_format)
    return history


def export_checkpoint(training_state: str | Path, path: str | Path, **metadata: Any) -> None:
    """Turn a training-state file into a course checkpoint (model + metadata only)."""
    state = read_training_state(training_state)
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    save_checkpoint(model, path, **{**state["metadata"], "history": state["history"], **metadata})


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: Any, batch_size: int = 512, device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen representations of a data set.

    Returns:
        (H float32 [N, r] on the CPU, y int64 [N]).
    """
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    features = _forward_batches(encoder, _dataset_images(dataset), batch_size, device, "features" if progress else None)
    return features, getattr(dataset, "labels").clone().long()


def _forward_batches(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                     progress: str | None = None) -> torch.Tensor:
    """``model`` in eval mode (restored afterwards) over uint8 images [N, 3, H, W] in batches, under
    autocast: float32 outputs [N, ...] on the CPU.  ``progress`` names a tqdm bar (None: no bar)."""
    outputs = []
    with eval_mode(model.to(device)), torch.no_grad():
        for start in tqdm(range(0, images.shape[0], batch_size), desc=progress, disable=progress is None,
                          leave=False):
            x = images[start:start + batch_size].to(device).float().div_(255)
            with autocast(device):
                outputs.append(model(x).float().cpu())
    return torch.cat(outputs)


@dataclass
class ProbeResult:
    """Linear probe on frozen features.

    ``classifier`` is an ``nn.Linear(r, C)`` that takes *raw* features h (the standardisation is
    folded into its weights), so ``classifier(h)`` gives the probe's logits, e.g. for Grad-CAM.
    """

    accuracy: float
    classifier: nn.Linear
    predictions: torch.Tensor  # int64 [N_test]
    train_accuracy: float


def _check_features(H_train: torch.Tensor, y_train: torch.Tensor, H_test: torch.Tensor, y_test: torch.Tensor) -> None:
    check_features(H_train, "H_train")
    check_features(H_test, "H_test")
    if H_train.shape[1] != H_test.shape[1]:
        raise ValueError(f"features must be [N, r] with equal r, got {tuple(H_train.shape)} and {tuple(H_test.shape)}")
    if len(H_train) != len(y_train) or len(H_test) != len(y_test):
        raise ValueError("features and labels differ in length")


def _standardisation(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (floored at 1e-6) of features H [N, r], float64 on the CPU: ([r], [r])."""
    H = H.detach().cpu().double()
    return H.mean(0), H.std(0).clamp(min=1e-6)


def _on_raw_features(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The linear layer on raw h equal to ``weight @ ((h - mean) / std) + bias``: the standardisation is
    folded into its weights. weight [C, r], bias [C], mean and std [r] -> nn.Linear(r, C)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight / std)
        layer.bias.copy_(bias - (weight * mean / std).sum(1))
    return layer

def linear_probe(
    H_train: torch.Tensor, y_train: torch.Tensor, H_test: torch.Tensor, y_test: torch.Tensor,
    C: float = 1.0, max_iter: int = 300,
) -> ProbeResult:
    """Multinomial logistic regression on standardised frozen features, fitted by full-batch L-BFGS.

    Minimises ``mean cross-entropy + ||W||^2 / (2 C N)`` — scikit-learn's
    ``LogisticRegression(C=C)`` objective divided by N — in float64 with PyTorch.

    Args:
        H_train [N, r], y_train [N] int64 labels, H_test [M, r], y_test [M]; C: inverse L2 strength.
    """
    _check_features(H_train, y_train, H_test, y_test)
    H_train, y_train, H_test, y_test = H_train.cpu(), y_train.cpu(), H_test.cpu(), y_test.cpu()
    classes, targets = torch.unique(y_train, return_inverse=True)
    mean, std = _standardisation(H_train)
    x = (H_train.double() - mean) / std
    weight = torch.zeros(len(classes), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2 * C * len(x))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, targets) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    classifier = _on_raw_features(weight.detach(), bias.detach(), mean, std)
    with torch.no_grad():
        predictions = classes[classifier(H_test.float()).argmax(1)]
        train_predictions = classes[classifier(H_train.float()).argmax(1)]
    return ProbeResult(
        accuracy=(predictions == y_test).float().mean().item(),
        classifier=classifier,
        predictions=predictions,
        train_accuracy=(train_predictions == y_train).float().mean().item(),
    )


def random_linear_head(H: torch.Tensor, n_classes: int, seed: int = 0) -> nn.Linear:
    """A linear head with Gaussian weights on standardised features: the control for explaining a probe.

    It has the form of ``linear_probe``'s classifier (it takes raw h and standardises with the mean and
    std of ``H``) but has learned nothing, so an explanation of its logits shows what any scalar of h
    would highlight. Where the probe's explanation scores no better than this head's, the score says
    nothing about the probe's evidence.

    Args:
        H [N, r]: the features the probe was fitted on; n_classes: number of outputs; seed: for the weights.
    Returns:
        ``nn.Linear(r, n_classes)`` with logits = W (h - mean) / std, W ~ N(0, 1) [n_classes, r].
    """
    if H.ndim != 2 or len(H) < 2 or not torch.isfinite(H).all():
        raise ValueError(f"H must be finite features [N >= 2, r], got shape {tuple(H.shape)}")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    mean, std = _standardisation(H)
    weight = torch.randn(n_classes, H.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return _on_raw_features(weight, torch.zeros(n_classes, dtype=torch.float64), mean, std)


def knn_accuracy(
    H_train: torch.Tensor, y_train: torch.Tensor, H_test: torch.Tensor, y_test: torch.Tensor,
    k: int = 200, temperature: float = 0.1, chunk: int = 1024,
) -> float:
    """Weighted k-NN accuracy with cosine similarity: each of the k nearest training samples votes
    for its class with weight exp(sim / temperature) (Wu et al. 2018, as in SimCLR evaluations)."""
    _check_features(H_train, y_train, H_test, y_test)
    H_train, y_train, H_test, y_test = H_train.cpu(), y_train.cpu(), H_test.cpu(), y_test.cpu()
    k = min(k, len(H_train))
    train = F.normalize(H_train.float(), dim=1)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for start in range(0, len(H_test), chunk):
        test = F.normalize(H_test[start:start + chunk].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), n_classes).scatter_add_(1, y_train[idx], torch.exp(sims / temperature))
        correct += (votes.argmax(1) == y_test[start:start + chunk]).sum().item()
    return correct / len(H_test)


def kth_neighbour_distance(H_reference: torch.Tensor, H_query: torch.Tensor, k: int = 10, chunk: int = 1024,
                           exclude_self: bool = False) -> torch.Tensor:
    """Cosine distance ``1 - cos`` from each query to its k-th nearest reference sample: float [N_query].

    A label-free "how typical is this sample" score (large = far from the training data).  With
    ``exclude_self`` (query = reference) each sample's match with itself is skipped.
    """
    if H_reference.ndim != 2 or H_query.ndim != 2 or H_reference.shape[1] != H_query.shape[1]:
        raise ValueError(f"need features [N, r] with the same r, got {tuple(H_reference.shape)} and "
                         f"{tuple(H_query.shape)}")
    rank = k + int(exclude_self)
    if not 1 <= rank <= len(H_reference):
        raise ValueError(f"k = {k} needs at least {rank} reference samples, got {len(H_reference)}")
    reference = F.normalize(H_reference.float().cpu(), dim=1)
    distances = []
    for start in range(0, len(H_query), chunk):
        query = F.normalize(H_query[start:start + chunk].float().cpu(), dim=1)
        distances.append(1 - (query @ reference.T).topk(rank, dim=1).values[:, -1])
    return torch.cat(distances)


def raw_pixel_features(dataset: Any, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-pixel baseline: flattened images in [0, 1] (optionally downsampled), [N, 3 S S]."""
    images = _dataset_images(dataset).float() / 255
    if size is not None:
        images = F.interpolate(images, size=(size, size), mode="area")
    return images.flatten(1), getattr(dataset, "labels").clone().long()


def train_supervised(
    encoder: nn.Module, train: Any, epochs: int = 10, batch_size: int = 256, lr: float = 2e-3,
    augment: SimCLRAugment | None = None, seed: int = 0, device: torch.device | str | None = None,
    progress: bool = False,
) -> nn.Sequential:
    """The supervised reference: ``encoder`` + a linear head trained end to end with cross-entropy
    on ``train``'s labels (AdamW, warm-up + cosine, bf16 where supported).

    Args:
        encoder: a fresh encoder (trained in place), output [B, r] with ``.out_dim == r``.
        train: a data set with ``.images`` uint8 [N, 3, H, W] and ``.labels`` int64 [N].
        augment: view generator for training (default: crop scale 0.5-1 and flip, no colour change).
    Returns:
        ``nn.Sequential(encoder, nn.Linear(r, C))`` in eval mode on ``device``: images -> logits [B, C].
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    images, labels = _dataset_images(train), getattr(train, "labels").long()
    device = torch.device(device) if device is not None else get_device()
    augment = augment or SimCLRAugment(images.shape[-1], crop_scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)
    net = nn.Sequential(encoder, nn.Linear(encoder.out_dim, int(labels.max()) + 1)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    total_steps = epochs * _epoch_indices(images.shape[0], 0, seed, batch_size).shape[0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total_steps, 0.03))
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    net.train()
    for epoch in tqdm(range(epochs), desc="supervised", disable=not progress):
        for index in _epoch_indices(images.shape[0], epoch, seed, batch_size):
            index = index.to(device)
            x = augment(images[index].float().div_(255), generator)
            with autocast(device):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return net.eval()


def classification_accuracy(model: nn.Module, dataset: Any, batch_size: int = 512) -> float:
    """Share of ``dataset`` (``.images`` uint8, ``.labels``) whose argmax logit is the label."""
    logits = _forward_batches(model, _dataset_images(dataset), batch_size, next(model.parameters()).device)
    return (logits.argmax(1) == getattr(dataset, "labels").long()).float().mean().item()


def supervised_accuracy(
    encoder: nn.Module, train: Any, test: Any, epochs: int = 10, batch_size: int = 256, lr: float = 2e-3,
    augment: SimCLRAugment | None = None, seed: int = 0, device: torch.device | str | None = None,
) -> float:
    """Test accuracy of ``train_supervised(encoder, train, ...)`` on ``test``, in [0, 1]."""
    model = train_supervised(encoder, train, epochs, batch_size, lr, augment, seed, device)
    return classification_accuracy(model, test)
