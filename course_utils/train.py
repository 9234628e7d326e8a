"""``python -m course_utils.train --preset NAME``: reproducible SimCLR checkpoints (and the toy CLIP).

Each preset fixes data, encoder, augmentation and optimisation.  The run writes
a training-state file (resumable with ``--resume``), then a course checkpoint
``<out>/<name>.pt`` whose metadata holds the exact command, and
``<out>/<name>.json`` with the evaluation: linear-probe and k-NN accuracy on
held-out data, next to a random-init encoder of the same architecture and raw
pixels.  ``--commit`` writes into ``data/checkpoints`` and registers the sha256.
Runs unchanged under ``torchrun --nproc_per_node=N`` (DDP).

The training state lives in ``<data root>/train/<preset>.<key>.state.pt``, where ``key`` hashes the
settings that define the run (preset, epochs, seed, data, encoder, batch, ...), so runs with other
settings never overwrite it.  A run whose state exists refuses to start without ``--resume`` (continue
it) or ``--restart`` (discard it); Ctrl-C prints the command that resumes; the state is removed once
the checkpoint is written.

``--preset shapes-clip`` trains the offline toy CLIP of FALCON (``course_utils.vlm``) on ShapesWorld
image-caption pairs instead, and reports its zero-shot accuracy per attribute; it is committed to
``data/checkpoints/vlm/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from course_utils.data.augment import SimCLRAugment
from course_utils.data.datasets import ImageTensorDataset, default_data_root, load_dataset
from course_utils.models import (
    SimCLRModel, atomic_write, checkpoint_dir, load_pretrained, resnet, write_checksum,
)
from course_utils.runtime import get_device, seed_everything
from course_utils.simclr import (
    TrainingStateError, export_checkpoint, extract_features, knn_accuracy, linear_probe, raw_pixel_features,
    read_training_state, supervised_accuracy, train_simclr,
)

PROGRAM = "python -m course_utils.train"


@dataclass(frozen=True)
class Preset:
    """Everything a training run depends on."""

    name: str
    description: str
    data: str
    data_options: dict[str, Any]
    depth: int
    width: int
    epochs: int
    batch_size: int = 256
    lr: float = 2e-3
    temperature: float = 0.2
    small_input: bool = True
    augment: dict[str, Any] = field(default_factory=dict)
    device_hint: str = "cpu"  # the device the preset is sized for


NO_COLOUR = {"jitter_p": 0.0, "grayscale_p": 0.0}
GRAY_IMAGES = {"saturation": 0.0, "hue": 0.0, "brightness": 0.4, "contrast": 0.4, "grayscale_p": 0.0}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("simclr-shapes-r10", "ShapesWorld 32 px, ResNet-10 width 32, bf16 on CPU (the course's default encoder)",
           "shapes", {"n": 20_000, "size": 32, "seed": 0}, depth=10, width=32, epochs=25),
    Preset("simclr-shapes-r10-w16", "ShapesWorld 32 px, ResNet-10 width 16, 60 epochs, bf16 on CPU (about 25 minutes): "
           "more accurate than width 32 in the same time, and its probe-class Grad-CAM localises better",
           "shapes", {"n": 20_000, "size": 32, "seed": 0}, depth=10, width=16, epochs=60),
    Preset("simclr-shapes-r10-nocolor", "as simclr-shapes-r10 but without colour jitter and grayscale",
           "shapes", {"n": 20_000, "size": 32, "seed": 0}, depth=10, width=32, epochs=25, augment=NO_COLOUR),
    Preset("simclr-fmnist-r10", "Fashion-MNIST 28 px, ResNet-10 width 32, bf16 on CPU (about 15 minutes)",
           "fashion-mnist", {}, depth=10, width=32, epochs=5, augment={"crop_scale": (0.5, 1.0), **GRAY_IMAGES}),
    Preset("simclr-fmnist-r10-long", "Fashion-MNIST 28 px, ResNet-10 width 32, 10 epochs with small rotations and "
           "random erasing, bf16 on CPU (about 25 minutes; 80 in fp32 on a CPU without bf16)",
           "fashion-mnist", {}, depth=10, width=32, epochs=10,
           augment={"crop_scale": (0.5, 1.0), **GRAY_IMAGES, "rotate_degrees": 10.0, "erase_p": 0.5,
                    "erase_scale": (0.02, 0.2)}),
    Preset("simclr-shapes-r18-gpu", "ShapesWorld 32 px, ResNet-18 width 64 (GPU)",
           "shapes", {"n": 50_000, "size": 32, "seed": 0}, depth=18, width=64, epochs=100, batch_size=512,
           device_hint="cuda"),
    Preset("simclr-cifar10-r18-gpu", "CIFAR-10, ResNet-18 width 64 (GPU; needs the CIFAR-10 files)",
           "cifar10", {}, depth=18, width=64, epochs=200, batch_size=512, lr=1e-3, temperature=0.5,
           augment={"crop_scale": (0.2, 1.0), "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
           device_hint="cuda"),
    Preset("simclr-stl10-r50-gpu", "STL-10 unlabeled 96 px, ResNet-50 width 64 (GPU; needs the STL-10 files)",
           "stl10", {}, depth=50, width=64, epochs=100, batch_size=256, lr=1e-3, temperature=0.2,
           small_input=False,
           augment={"crop_scale": (0.08, 1.0), "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1,
                    "blur_p": 0.5},
           device_hint="cuda"),
]}


@dataclass(frozen=True)
class ClipPreset:
    """A toy-CLIP training run (course_utils.vlm)."""

    name: str
    description: str
    world: dict[str, Any]
    epochs: int
    batch_size: int = 256
    lr: float = 2e-3
    width: int = 16
    dim: int = 128


CLIP_PRESETS: dict[str, ClipPreset] = {p.name: p for p in [
    ClipPreset("shapes-clip", "toy CLIP for FALCON: ResNet-10 width 32 + 2-layer text transformer on ShapesWorld "
               "image-caption pairs (CPU, about 30 minutes)", {"n": 20_000, "distractor_p": 0.3}, epochs=40, width=32),
]}


@dataclass(frozen=True)
class FactorPreset:
    """The models of notebook 10's interventions, trained together on ShapesWorld (course_utils.explain.protovae):
    an attribute classifier (the judge of what an intervention changed), a plain beta-VAE, a ProtoVAE and a
    decoder of the frozen SimCLR encoder's h."""

    name: str
    description: str
    n: int
    epochs: int  # of each VAE and of the decoder of h
    classifier_n: int = 20_000  # training images of the attribute classifier (the judge)
    classifier_epochs: int = 8
    latent_dim: int = 10
    beta: float = 4.0
    encoder: str = "simclr-shapes-r10"
    factors: tuple[str, ...] = ("shape", "color", "size", "position", "texture", "background", "background_color")


FACTOR_PRESETS: dict[str, FactorPreset] = {p.name: p for p in [
    FactorPreset("shapes-protovae", "attribute classifier, beta-VAE, ProtoVAE (d = 10) and a decoder of "
                 "simclr-shapes-r10's h on 10,000 ShapesWorld images (CPU)", n=10_000, epochs=10),
]}


def factor_labels(world: Any, factors: tuple[str, ...]) -> torch.Tensor:
    """ShapesWorld attribute values as integer factors [N, K] in the order of ``factors``."""
    return torch.stack([world.attributes[name].long() for name in factors], dim=1)


def _train_factor_models(preset: FactorPreset, epochs: int, args: argparse.Namespace, device: torch.device,
                         command: str) -> dict[str, Any]:
    from course_utils.data.shapes import ShapesWorld
    from course_utils.explain.protovae import (
        AttributeClassifier, ProtoVAE, RepresentationDecoder, save_factor_model, train_attribute_classifier,
        train_protovae, train_representation_decoder,
    )

    train = ShapesWorld(n=preset.n, size=32, seed=args.seed, split="train")
    test = ShapesWorld(n=min(5_000, preset.n), size=32, seed=args.seed, split="test")
    y_train, y_test = factor_labels(train, preset.factors), factor_labels(test, preset.factors)
    out = checkpoint_dir() / "protovae" if args.commit else (args.out or default_data_root() / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{preset.name}: {preset.description}\ndevice {device}; command: {command}", flush=True)
    result: dict[str, Any] = {"preset": preset.name, "command": command, "epochs": epochs, "n": preset.n,
                              "factors": list(preset.factors), "minutes": {}}

    def timed(name: str, train_one: Any) -> Any:
        started = time.perf_counter()
        value = train_one()
        result["minutes"][name] = round((time.perf_counter() - started) / 60, 2)
        print(f"{name}: {result['minutes'][name]} min", flush=True)
        return value

    judge_world = ShapesWorld(n=preset.classifier_n, size=32, seed=args.seed, split="train")
    judge_epochs = min(epochs, preset.classifier_epochs)  # --epochs caps the judge too (tests, smoke runs)
    torch.manual_seed(args.seed)
    classifier = AttributeClassifier({f: len(train.attribute_names[f]) for f in preset.factors}).to(device)
    timed("attribute_classifier", lambda: train_attribute_classifier(
        classifier, judge_world.images, factor_labels(judge_world, preset.factors), judge_epochs, seed=args.seed,
        progress=False))
    predicted = torch.cat([classifier.predict(b.float().div(255).to(device)).cpu() for b in test.images.split(500)])
    result["attribute_accuracy"] = {f: round(float((predicted[:, k] == y_test[:, k]).float().mean()), 4)
                                    for k, f in enumerate(preset.factors)}
    save_factor_model(classifier.cpu(), out / f"{preset.name}-attributes.pt", command=command,
                      accuracy=result["attribute_accuracy"])
    for name, weights in (("vae", {"identification_weight": 0.0, "consistency_weight": 0.0, "cluster_weight": 0.0}),
                          ("protovae", {})):
        torch.manual_seed(args.seed)
        vae = ProtoVAE(latent_dim=preset.latent_dim).to(device)
        history = timed(name, lambda: train_protovae(vae, train.images, epochs, beta=preset.beta, seed=args.seed,
                                                       progress=False, **weights))
        result[name] = {"reconstruction": round(history.reconstruction[-1], 2), "kl": round(history.kl[-1], 3),
                        "identification_accuracy": round(history.identification_accuracy[-1], 4)}
        save_factor_model(vae.cpu(), out / f"{preset.name}-{name}.pt", command=command, beta=preset.beta, **result[name])
    encoder = load_pretrained(preset.encoder).encoder.to(device).eval()
    h_train = extract_features(encoder, train, device=device, progress=False)[0]
    torch.manual_seed(args.seed)
    decoder = RepresentationDecoder(h_train.shape[1]).to(device)
    losses = timed("h_decoder", lambda: train_representation_decoder(decoder, h_train, train.images, epochs,
                                                                     seed=args.seed, progress=False))
    result["h_decoder"] = {"reconstruction": round(losses[-1], 2), "encoder": preset.encoder}
    save_factor_model(decoder.cpu(), out / f"{preset.name}-h-decoder.pt", command=command, **result["h_decoder"])
    atomic_write(out / f"{preset.name}.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    if args.commit:
        for part in ("attributes", "vae", "protovae", "h-decoder"):
            write_checksum(out / f"{preset.name}-{part}.pt")
    print(json.dumps(result, indent=2), flush=True)
    return result


def _train_clip(preset: ClipPreset, epochs: int, args: argparse.Namespace, device: torch.device,
                command: str) -> dict[str, Any]:
    from course_utils.data.captions import load_caption_set
    from course_utils.data.shapes import ShapesWorld
    from course_utils.vlm import ToyCLIP, Vocabulary, class_prompts, save_toy_clip, train_toy_clip, zero_shot_accuracy

    world = ShapesWorld(seed=args.seed, split="train", **preset.world)
    test = ShapesWorld(n=5_000, seed=args.seed, split="test", distractor_p=preset.world.get("distractor_p"))
    prompts = [p for attribute in ("shape", "color", "background_color") for group in class_prompts(test, attribute)
               for p in group]
    vocabulary = Vocabulary.from_texts(load_caption_set() + prompts)
    torch.manual_seed(args.seed)
    model = ToyCLIP(vocabulary, dim=preset.dim, width=preset.width)
    print(f"{preset.name}: {preset.description}\nvocabulary: {len(vocabulary)} words; device {device}; "
          f"command: {command}", flush=True)
    started = time.perf_counter()

    def report(epoch: int, history: Any) -> None:
        print(f"epoch {epoch}/{epochs} loss {history.loss[-1]:.4f} "
              f"elapsed {(time.perf_counter() - started) / 60:.1f} min", flush=True)

    history = train_toy_clip(model, world, epochs, batch_size=preset.batch_size, lr=preset.lr, seed=args.seed,
                             device=device, progress=False, callback=report)
    zero_shot = {attribute: round(zero_shot_accuracy(model, test, attribute), 4)
                 for attribute in ("shape", "color", "background_color", "texture", "size")}
    result = {"preset": preset.name, "command": command, "train_minutes": round((time.perf_counter() - started) / 60, 2),
              "device": str(device), "epochs": epochs, "zero_shot_accuracy": zero_shot,
              "loss": [round(v, 4) for v in history.loss]}
    out = checkpoint_dir() / "vlm" if args.commit else (args.out or default_data_root() / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    save_toy_clip(model.cpu(), out / f"{preset.name}.pt", **result)
    atomic_write(out / f"{preset.name}.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    if args.commit:
        write_checksum(out / f"{preset.name}.pt")
    print(json.dumps(result, indent=2), flush=True)
    return result


def _data(preset: Preset, split: str) -> Any:
    if preset.data == "shapes":
        options = dict(preset.data_options)
        if split != "train":
            options["n"] = 5_000
        return load_dataset("shapes", split=split, **options)
    if preset.data == "stl10" and split == "train":
        return load_dataset("stl10", split="unlabeled")
    return load_dataset(preset.data, split=split, **preset.data_options)


def _subset(dataset: Any, n: int) -> ImageTensorDataset:
    """The first ``n`` images of a data set (for the per-epoch k-NN monitor)."""
    return ImageTensorDataset(dataset.images[:n], dataset.labels[:n].long(), list(dataset.classes),
                              name=type(dataset).__name__, split="monitor", source=f"first {n} of {dataset!r}")


def evaluate(model: SimCLRModel, preset: Preset, device: torch.device) -> dict[str, float]:
    """Linear probe and k-NN on held-out data, with random-init and raw-pixel references."""
    train_eval = _data(preset, "train") if preset.data != "stl10" else load_dataset("stl10", split="train")
    test = _data(preset, "test")
    features = {"simclr": model.encoder}
    random_init = SimCLRModel(resnet(preset.depth, preset.width, preset.small_input)).encoder
    features["random_init"] = random_init
    metrics: dict[str, float] = {}
    for name, encoder in features.items():
        train_h = extract_features(encoder, train_eval, device=device, progress=False)
        test_h = extract_features(encoder, test, device=device, progress=False)
        metrics[f"{name}_probe"] = linear_probe(*train_h, *test_h).accuracy
        metrics[f"{name}_knn"] = knn_accuracy(*train_h, *test_h)
    pixel_size = 16 if train_eval.images.shape[-1] > 32 else None
    metrics["raw_pixels_probe"] = linear_probe(*raw_pixel_features(train_eval, pixel_size),
                                               *raw_pixel_features(test, pixel_size)).accuracy
    return metrics


def _supervised_reference(preset: Preset, data: Any, args: argparse.Namespace, out: Path, device: torch.device,
                          command: str) -> dict[str, Any]:
    """The supervised upper reference of a preset: same encoder and data, trained on the labels."""
    train = load_dataset("stl10", split="train") if preset.data == "stl10" else data
    started = time.perf_counter()
    encoder = resnet(preset.depth, preset.width, preset.small_input)
    accuracy = supervised_accuracy(encoder, train, _data(preset, "test"), epochs=args.supervised,
                                   batch_size=preset.batch_size, lr=preset.lr, seed=args.seed, device=device)
    result = {"preset": preset.name, "command": command, "supervised_epochs": args.supervised,
              "train_minutes": round((time.perf_counter() - started) / 60, 2), "supervised_accuracy": accuracy}
    atomic_write(out / f"{preset.name}.supervised.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(json.dumps(result, indent=2), flush=True)
    return result


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--epochs 0`` must not mean "the preset's epochs")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def _is_flag(token: str, *flags: str) -> bool:
    """Whether a command-line token is one of ``flags`` or an abbreviation of one that argparse accepts."""
    return len(token) > 4 and any(flag.startswith(token) for flag in flags)


def run_settings(preset: Preset, epochs: int, seed: int) -> dict[str, Any]:
    """The settings that define a SimCLR run: runs that differ in any of them keep separate states."""
    def plain(options: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}

    return {"preset": preset.name, "data": preset.data, "data_options": plain(preset.data_options),
            "depth": preset.depth, "width": preset.width, "small_input": preset.small_input,
            "augment": plain(preset.augment), "epochs": epochs, "batch_size": preset.batch_size,
            "lr": preset.lr, "temperature": preset.temperature, "seed": seed}


def state_path(preset: Preset, epochs: int, seed: int) -> Path:
    """``<data root>/train/<preset>.<key>.state.pt``, key = a short hash of ``run_settings``."""
    settings = json.dumps(run_settings(preset, epochs, seed), sort_keys=True, default=list)
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return default_data_root() / "train" / f"{preset.name}.{key}.state.pt"


def _check_writable(folder: Path, what: str) -> str | None:
    """None if files can be created in ``folder`` (made if missing), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        return f"cannot write to {what} {folder} ({error.strerror or error})"
    return None


def _adopt_legacy_state(state_file: Path, preset: Preset, epochs: int, seed: int) -> None:
    """Rename a state of the older per-preset layout (``<preset>.state.pt``) to ``state_file`` if it was
    written by a run with the same settings."""
    legacy = state_file.parent / f"{preset.name}.state.pt"
    if state_file.exists() or not legacy.is_file():
        return
    try:
        stored = read_training_state(legacy).get("metadata", {})
    except (TrainingStateError, OSError):
        return
    settings = run_settings(preset, epochs, seed)
    if all(stored.get(k) == settings[k] for k in ("preset", "data", "data_options", "augment", "epochs",
                                                   "batch_size", "lr", "temperature", "seed")):
        os.replace(legacy, state_file)
        print(f"moved the training state {legacy} of this run to {state_file}", flush=True)


def _epochs_done(state_file: Path, args: argparse.Namespace, epochs: int, command: str) -> int:
    """Check the run's training state against --resume / --restart: the number of finished epochs to
    continue after, or SystemExit with the command that resumes or restarts."""
    if args.restart:
        return 0
    if not state_file.is_file():
        if args.resume:
            raise SystemExit(f"error: --resume: there is no training state for this run ({state_file} does not "
                             f"exist), so there is nothing to resume. Start the run with:\n  {command}")
        return 0
    try:
        done = int(read_training_state(state_file)["epoch"]) + 1
    except TrainingStateError as error:
        raise SystemExit(f"error: {error}. Discard it and start this run over with:\n  {command} --restart"
                         ) from None
    if not args.resume:
        status = (f"it holds epoch {done} of {epochs}" if done < epochs else
                  f"training finished ({done} epochs) but the checkpoint was not written")
        raise SystemExit(f"error: this run has an unfinished training state, {state_file} ({status}). "
                         f"Continue it with:\n  {command} --resume\nor discard it and start over with:\n"
                         f"  {command} --restart")
    return done


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS) + sorted(CLIP_PRESETS) + sorted(FACTOR_PRESETS))
    parser.add_argument("--epochs", type=_positive_int, help="override the preset's epochs")
    parser.add_argument("--out", type=Path, help="output folder (default data/cache/checkpoints)")
    parser.add_argument("--commit", action="store_true", help="write into data/checkpoints and register the sha256")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true",
                       help="continue this run (same preset and settings) from its training-state file")
    state.add_argument("--restart", action="store_true",
                       help="discard this run's training-state file and start over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snapshots", type=_positive_int, nargs="*", default=[], metavar="EPOCH",
                        help="also save the encoder after these epochs (<out>/<name>.epochN.pt), for calibration")
    parser.add_argument("--supervised", type=_positive_int, metavar="EPOCHS",
                        help="instead of SimCLR, train the supervised reference (same encoder, labels, "
                             "cross-entropy) for EPOCHS and write <out>/<name>.supervised.json")
    args = parser.parse_args(argv)
    # the command that reproduces the run; --resume / --restart are how it is run, not what it trains
    tokens = [a for a in (argv if argv is not None else sys.argv[1:]) if not _is_flag(a, "--resume", "--restart")]
    command = PROGRAM + " " + " ".join(shlex.quote(a) for a in tokens)
    other_kinds = {**{n: (p, "protovae", _train_factor_models) for n, p in FACTOR_PRESETS.items()},
                   **{n: (p, "vlm", _train_clip) for n, p in CLIP_PRESETS.items()}}
    if args.preset in other_kinds:  # the toy CLIP and the factor models: no training state, no snapshots
        if args.supervised is not None or args.snapshots or args.resume or args.restart:
            parser.error("--supervised, --snapshots, --resume and --restart apply to SimCLR presets only")
        other, folder, train_other = other_kinds[args.preset]
        problem = _check_writable(checkpoint_dir() / folder if args.commit else
                                  (args.out or default_data_root() / "checkpoints"), "the output folder")
        if problem:
            parser.error(f"{problem}; choose a writable --out")
        seed_everything(args.seed)
        return train_other(other, args.epochs if args.epochs is not None else other.epochs, args, get_device(), command)
    if args.supervised is not None and (args.resume or args.restart):
        parser.error("--resume and --restart apply to SimCLR training, not to --supervised")
    preset = PRESETS[args.preset]
    epochs = args.epochs if args.epochs is not None else preset.epochs

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = get_device()
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    seed_everything(args.seed)
    out = checkpoint_dir() if args.commit else (args.out or default_data_root() / "checkpoints")
    problem = _check_writable(out, "the output folder")  # before hours of training, not after
    if problem:
        parser.error(f"{problem}; choose a writable --out")
    if args.supervised is not None:
        if distributed:
            parser.error("--supervised needs a single process (it does not use torchrun)")
        return _supervised_reference(preset, _data(preset, "train"), args, out, device, command)
    state_file = state_path(preset, epochs, args.seed)
    problem = _check_writable(state_file.parent, "the training-state folder")
    if problem:
        raise SystemExit(f"error: {problem}; set COURSE_DATA_ROOT to a writable folder")
    if args.resume and not distributed:
        _adopt_legacy_state(state_file, preset, epochs, args.seed)
    epochs_done = _epochs_done(state_file, args, epochs, command)
    if args.restart and rank == 0:
        for stale in (state_file, state_file.with_name(state_file.name + ".tmp")):
            if stale.exists():
                stale.unlink()
                print(f"--restart: removed {stale}", flush=True)
    if distributed:  # every process has checked the state before rank 0 may write a new one
        dist.barrier()
    data = _data(preset, "train")
    if rank == 0:
        print(f"{preset.name}: {preset.description}\ndata: {getattr(data, 'source', repr(data))}\n"
              f"device: {device}, epochs: {epochs}, command: {command}", flush=True)
    model = SimCLRModel(resnet(preset.depth, preset.width, preset.small_input))
    if preset.device_hint == "cuda" and device.type != "cuda" and rank == 0:
        print(f"warning: {preset.name} is sized for a GPU but runs on {device}; expect hours, or pick a CPU "
              f"preset ({', '.join(n for n, p in PRESETS.items() if p.device_hint == 'cpu')})", flush=True)
    augment = SimCLRAugment(data.images.shape[-1], **preset.augment)
    started = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)

    progress = {"done": epochs_done}  # epochs whose state is saved, for the Ctrl-C message

    def report(epoch: int, history: Any) -> None:
        progress["done"] = epoch
        if rank == 0:
            if epoch in args.snapshots:
                encoder_state = {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()}
                atomic_write(out / f"{preset.name}.epoch{epoch}.pt", lambda f: torch.save(encoder_state, f))
            knn = f" kNN {history.knn[-1]:.3f}" if history.knn[-1] is not None else ""
            print(f"epoch {epoch}/{epochs} loss {history.loss[-1]:.4f} pairs/s {history.pairs_per_s[-1]:.0f}{knn} "
                  f"elapsed {(time.perf_counter() - started) / 60:.1f} min", flush=True)

    monitor = None
    if preset.data != "stl10":  # k-NN accuracy after each epoch on held-out images (5000 train / 2000 test)
        monitor = (_subset(data, 5_000), _subset(_data(preset, "test"), 2_000))
    result: dict[str, Any] = {}
    try:
        history = train_simclr(
            model, data, epochs, batch_size=preset.batch_size, lr=preset.lr, temperature=preset.temperature,
            augment=augment, seed=args.seed, device=device, checkpoint=state_file, resume=args.resume,
            knn_data=monitor, callback=report, progress=False,
            metadata={"preset": preset.name, "command": command, "data": preset.data,
                      "data_options": run_settings(preset, epochs, args.seed)["data_options"],
                      "augment": run_settings(preset, epochs, args.seed)["augment"],
                      "epochs": epochs, "batch_size": preset.batch_size, "lr": preset.lr,
                      "temperature": preset.temperature, "seed": args.seed},
        )
        if rank == 0:
            minutes = sum(history.seconds) / 60
            metrics = evaluate(model, preset, device)
            result = {"preset": preset.name, "command": command, "train_minutes": round(minutes, 2),
                      "device": str(device), "epochs": epochs, **{k: round(v, 4) for k, v in metrics.items()}}
            checkpoint = out / f"{preset.name}.pt"
            export_checkpoint(state_file, checkpoint, metrics=result)
            atomic_write(out / f"{preset.name}.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
            if args.commit:
                write_checksum(checkpoint)
            state_file.unlink()  # the checkpoint holds the model, history and metadata; a rerun starts afresh
            print(json.dumps(result, indent=2), flush=True)
    except KeyboardInterrupt:
        if rank == 0:
            if state_file.is_file():
                print(f"\ninterrupted after epoch {progress['done']} of {epochs}; the training state is in "
                      f"{state_file}. Resume with:\n  {command} --resume", file=sys.stderr, flush=True)
            else:
                print(f"\ninterrupted before the first epoch finished; nothing was saved. Start again with:\n"
                      f"  {command}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if distributed:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
