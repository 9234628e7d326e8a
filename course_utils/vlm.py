"""Vision-language models for FALCON: an offline toy CLIP and an adapter for real CLIP weights.

Both give the same two calls, L2-normalised so that a dot product is a cosine:

* ``encode_images(images)``: float [B, 3, H, W] in [0, 1] -> [B, d];
* ``encode_texts(texts)``: list of T strings -> [T, d].

``ToyCLIP`` is a small image encoder (ResNet-10) and a small transformer text encoder trained
contrastively on ShapesWorld image-caption pairs (``python -m course_utils.train --preset shapes-clip``);
its text encoder sees word order, so "a red star on a blue background" and "a blue star on a red
background" differ.  ``OpenCLIP`` wraps open_clip (``pip install open-clip-torch``) for a real model such
as ViT-B-32, loaded from a local weights file — nothing is downloaded.

``caption_embeddings`` caches the text embeddings of a caption set per (model, captions), keyed by their
hashes and written atomically; ``top_captions`` retrieves the best captions per image in chunks, so
memory stays bounded for 10^6 captions.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.data.captions import describe
from course_utils.inputs import check_images
from course_utils.models import atomic_write, load_verified, resnet
from course_utils.runtime import autocast, eval_mode, get_device

TOY_CLIP_FORMAT = "course-toyclip-v1"
_WORD = re.compile(r"[a-z]+")
_PAD, _UNKNOWN = 0, 1


class VisionLanguageModel(Protocol):
    """What FALCON needs from a vision-language model."""

    fingerprint: str  # identifies the weights, for caches

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def words(text: str) -> list[str]:
    """Lower-case alphabetic tokens of a text ("Mid-sized, red!" -> ["mid", "sized", "red"])."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> index for the toy text encoder (0 = padding, 1 = unknown word)."""

    def __init__(self, vocabulary: Sequence[str]) -> None:
        self.words = ["<pad>", "<unk>", *sorted(set(vocabulary) - {"<pad>", "<unk>"})]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "Vocabulary":
        return cls([w for text in texts for w in words(text)])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """Token indices LongTensor [T, max_length], padded with 0, unknown words 1, cut at max_length."""
        tokens = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, _UNKNOWN) for w in words(text)][:max_length]
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens


class ToyTextEncoder(nn.Module):
    """Word embeddings + learned positions + a small transformer, mean-pooled over the words: [T, dim]."""

    def __init__(self, vocabulary_size: int, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 24) -> None:
        super().__init__()
        self.max_length = max_length
        self.embedding = nn.Embedding(vocabulary_size, dim, padding_idx=_PAD)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padding = tokens == _PAD
        x = self.embedding(tokens) + self.position[: tokens.shape[1]]
        x = self.norm(self.transformer(x, src_key_padding_mask=padding))
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


class ToyCLIP(nn.Module):
    """A small CLIP for ShapesWorld: ResNet-10 image tower and transformer text tower, both to ``dim``.

    Args:
        vocabulary: the words the text tower knows (others map to an unknown token).
        dim: joint embedding size; width: ResNet width; text_dim, text_layers: text tower size.
    """

    def __init__(self, vocabulary: Vocabulary, dim: int = 128, width: int = 16, text_dim: int = 128,
                 text_layers: int = 2, max_length: int = 24) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.config = {"dim": dim, "width": width, "text_dim": text_dim, "text_layers": text_layers,
                       "max_length": max_length}
        self.image_tower = resnet(10, width)
        self.image_projection = nn.Linear(self.image_tower.out_dim, dim)
        self.text_tower = ToyTextEncoder(len(vocabulary), text_dim, text_layers, max_length=max_length)
        self.text_projection = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.fingerprint = "toy-clip (untrained)"
        self.metadata: dict = {}

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, dim] (with gradient, for training)."""
        return self.image_projection(self.image_tower(images))

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings [T, dim] (with gradient, for training)."""
        tokens = self.vocabulary.encode(texts, self.config["max_length"]).to(self.device)
        return self.text_projection(self.text_tower(tokens))

    def _encode(self, features: Callable[[Any], torch.Tensor], items: Any, batch_size: int) -> torch.Tensor:
        """``features`` of ``items`` in batches, in eval mode (restored afterwards), without gradient:
        L2-normalised float32 [len(items), dim] on the CPU."""
        with eval_mode(self), torch.no_grad():
            out = [F.normalize(features(items[start:start + batch_size]).float(), dim=1).cpu()
                   for start in range(0, len(items), batch_size)]
        return torch.cat(out)

    def encode_images(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """L2-normalised image embeddings float32 [B, dim] on the CPU; images [B, 3, H, W] in [0, 1]
        (``inputs.check_images``: uint8, 0–255 values, NaN/inf or an empty batch raise ``ValueError``)."""
        images = check_images(images, "images")

        def features(x: torch.Tensor) -> torch.Tensor:
            with autocast(self.device):
                return self.image_features(x.to(self.device, torch.float32))
        return self._encode(features, images, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 2048) -> torch.Tensor:
        """L2-normalised text embeddings float32 [T, dim] on the CPU."""
        return self._encode(self.text_features, _check_texts(texts), batch_size)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("encode_texts expects a list of strings, got one string; wrap it in a list")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("encode_texts expects a non-empty list of strings")
    return texts


# ---------------------------------------------------------------------------------------------
# Training and evaluating the toy CLIP
# ---------------------------------------------------------------------------------------------

@dataclass
class ClipHistory:
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _names(world, index: int) -> dict[str, str]:
    return {key: world.attribute_names[key][int(values[index])] for key, values in world.attributes.items()}


def clip_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching image/text pairs (row i of each is a pair): scalar."""
    image_embeddings = F.normalize(image_embeddings.float(), dim=1)
    text_embeddings = F.normalize(text_embeddings.float(), dim=1)
    logits = logit_scale.exp().clamp(max=100) * image_embeddings @ text_embeddings.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_toy_clip(model: ToyCLIP, world, epochs: int, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
                   device: torch.device | str | None = None, progress: bool = True,
                   callback: Callable[[int, ClipHistory], None] | None = None) -> ClipHistory:
    """Contrastive image-caption training on a ShapesWorld; every epoch draws new captions per image
    (``describe``: varied phrasing, some attributes left out), so the text tower learns words, not templates.
    Captions that leave an attribute out make pairs ambiguous, which is what a real caption set does too.
    ``callback(epoch, history)`` runs after each epoch (progress lines, live plots)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device) if device is not None else get_device()
    model.to(device).train()
    images = world.images.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(world) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps), pct_start=0.05)
    history = ClipHistory()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        started, losses = time.perf_counter(), []
        order = torch.randperm(len(world), generator=generator)
        batches = order[: len(order) // batch_size * batch_size].view(-1, batch_size)
        for index in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False):
            captions = [describe(_names(world, int(i)), rng) for i in index]
            x = images[index.to(device)].float().div_(255)
            with autocast(device):
                image_embeddings = model.image_features(x)
                text_embeddings = model.text_features(captions)
            loss = clip_loss(image_embeddings, text_embeddings, model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.epoch.append(epoch + 1)
        history.loss.append(sum(losses) / len(losses))
        history.seconds.append(time.perf_counter() - started)
        if callback is not None:
            callback(epoch + 1, history)
    model.eval()
    return history


def class_prompts(world, attribute: str) -> list[list[str]]:
    """For each value of ``attribute``: prompts "a {colour} {shape}" over every value of the other of the
    two (prompt ensembling); for other attributes "a {value} {shape}" over every shape."""
    names = world.attribute_names
    prompts = []
    for value in names[attribute]:
        if attribute == "shape":
            prompts.append([f"a {colour} {value}" for colour in names["color"]])
        elif attribute == "background_color":
            prompts.append([f"a {shape} on a {value} background" for shape in names["shape"]])
        else:
            prompts.append([f"a {value} {shape}" for shape in names["shape"]])
    return prompts


def zero_shot_accuracy(model: VisionLanguageModel, world, attribute: str) -> float:
    """Zero-shot classification of ``attribute`` (e.g. "shape", "color") on ``world``: each image gets the
    value whose averaged prompt embedding is most similar to the image's embedding."""
    if attribute not in world.attribute_names:
        raise ValueError(f"unknown attribute {attribute!r}; choose from {sorted(world.attribute_names)}")
    class_embeddings = torch.stack([F.normalize(model.encode_texts(p).mean(0), dim=0)
                                    for p in class_prompts(world, attribute)])
    image_embeddings = model.encode_images(world.images.float() / 255)
    predicted = (image_embeddings @ class_embeddings.T).argmax(1)
    return (predicted == world.attributes[attribute]).float().mean().item()


def save_toy_clip(model: ToyCLIP, path: str | Path, **metadata) -> None:
    """Write the toy CLIP (weights, architecture, vocabulary, metadata) atomically."""
    state = {"format": TOY_CLIP_FORMAT, "config": model.config, "vocabulary": model.vocabulary.words[2:],
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "metadata": metadata}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_toy_clip(path: str | Path, map_location: str | torch.device = "cpu", unregistered: str = "warn") -> ToyCLIP:
    """Load a toy CLIP checkpoint, read once and checksum-verified by ``models.load_verified``.

    Args:
        path: a file written by ``save_toy_clip``.
        map_location: device of the returned model.
        unregistered: a file without a line in the ``SHA256SUMS`` beside it: "warn" (default, an
            ``UnverifiedCheckpointWarning``), "error" (ValueError) or "allow". A registered file whose
            checksum does not match always raises ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy CLIP checkpoint not found: {path}; train it with "
                                "`python -m course_utils.train --preset shapes-clip --commit`")
    state, digest = load_verified(path, map_location, unregistered, kind="toy CLIP checkpoint")
    if not isinstance(state, dict) or state.get("format") != TOY_CLIP_FORMAT:
        raise ValueError(f"{path} is not a {TOY_CLIP_FORMAT!r} checkpoint")
    model = ToyCLIP(Vocabulary(state["vocabulary"]), **state["config"])
    model.load_state_dict(state["state_dict"])
    model.fingerprint = f"toy-clip:{digest}"
    model.metadata = dict(state.get("metadata") or {})
    return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------------
# A real CLIP through open_clip
# ---------------------------------------------------------------------------------------------

class OpenCLIP:
    """A CLIP model from open_clip (e.g. "ViT-B-32", the thesis' model) with local weights.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``).
        weights: path of the weights file (e.g. ``open_clip_pytorch_model.bin`` of
            laion2b_s34b_b79k); nothing is downloaded.
        random_init: build the architecture with random weights instead (tests, tiny configs).
        device: where to run (default ``get_device()``).
    Raises:
        FileNotFoundError: no weights file given or found, with what to do.
        ImportError: open_clip is not installed.
    """

    def __init__(self, model_name: str = "ViT-B-32", weights: str | Path | None = None, random_init: bool = False,
                 device: torch.device | str | None = None) -> None:
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError("OpenCLIP needs open_clip: pip install open-clip-torch") from exc
        if model_name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model {model_name!r}; e.g. {open_clip.list_models()[:5]}")
        if weights is None and not random_init:
            raise FileNotFoundError(
                f"no weights for {model_name}: this course never downloads them. Download the open_clip weights "
                f"once (e.g. laion2b_s34b_b79k for ViT-B-32 from the Hugging Face hub) and pass "
                f"weights='path/to/open_clip_pytorch_model.bin' — or use the offline ToyCLIP.")
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"CLIP weights file not found: {weights}")
        self.device = torch.device(device) if device is not None else get_device()
        pretrained = str(weights) if weights is not None else None
        self.model = open_clip.create_model(model_name, pretrained=pretrained, device=self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        source = f"{Path(weights).name}:{Path(weights).stat().st_size}" if weights is not None else "random"
        self.fingerprint = f"open_clip:{model_name}:{source}"

    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised embeddings float32 [B, d] on the CPU; images resized (bicubic) to the model's input
        size and normalised with CLIP's mean and std."""
        images = check_images(images, "images")
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].float()
                x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
                x = ((x - self.mean) / self.std).to(self.device)
                out.append(F.normalize(self.model.encode_image(x).float(), dim=1).cpu())
        return torch.cat(out)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """L2-normalised text embeddings float32 [T, d] on the CPU."""
        texts = _check_texts(texts)
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
                out.append(F.normalize(self.model.encode_text(tokens).float(), dim=1).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Caption embeddings: cache and chunked retrieval
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``<data root>/text_embeddings``: the data layer's root (``$COURSE_DATA_ROOT`` or ``<repo>/data/cache``)."""
    from course_utils.data.datasets import default_data_root

    return default_data_root() / "text_embeddings"


def caption_embeddings(model: VisionLanguageModel, captions: Sequence[str], cache_dir: str | Path | None = None,
                       refresh: bool = False) -> torch.Tensor:
    """Text embeddings [M, d] of a caption set, computed once per (model, caption set) and cached.

    The cache file is named by the sha256 of the model's fingerprint and of the captions, written
    atomically, and recomputed when it cannot be read or does not match.
    """
    captions = _check_texts(captions)
    digest = hashlib.sha256()
    digest.update(model.fingerprint.encode())
    for caption in captions:
        digest.update(caption.encode() + b"\n")
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{digest.hexdigest()[:32]}.pt"
    if path.is_file() and not refresh:
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, torch.Tensor) and cached.shape[0] == len(captions):
                return cached
        except Exception:  # a corrupt cache is recomputed below
            pass
    embeddings = model.encode_texts(captions)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(embeddings, f))
    return embeddings


def top_captions(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor, top_k: int = 5,
                 chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` most similar captions of each image, scanning the captions ``chunk`` at a time.

    Args:
        image_embeddings: [n, d]; caption_embeddings: [M, d] (both L2-normalised).
    Returns:
        (similarities float [n, top_k], caption indices LongTensor [n, top_k]), best first.  Memory is
        O(n · (chunk + top_k)), independent of M.
    """
    if image_embeddings.ndim != 2 or caption_embeddings.ndim != 2 or \
            image_embeddings.shape[1] != caption_embeddings.shape[1]:
        raise ValueError(f"need embeddings [n, d] and [M, d] with the same d, got {tuple(image_embeddings.shape)} "
                         f"and {tuple(caption_embeddings.shape)}")
    if not 1 <= top_k <= caption_embeddings.shape[0]:
        raise ValueError(f"top_k must lie in [1, {caption_embeddings.shape[0]}], got {top_k}")
    best_values = torch.full((image_embeddings.shape[0], 0), float("-inf"))
    best_index = torch.zeros((image_embeddings.shape[0], 0), dtype=torch.long)
    images = image_embeddings.float()
    for start in range(0, caption_embeddings.shape[0], chunk):
        block = images @ caption_embeddings[start:start + chunk].float().T  # [n, chunk]
        values, index = block.topk(min(top_k, block.shape[1]), dim=1)
        merged_values = torch.cat([best_values, values], 1)
        merged_index = torch.cat([best_index, index + start], 1)
        best_values, order = merged_values.topk(min(top_k, merged_values.shape[1]), dim=1)
        best_index = merged_index.gather(1, order)
    return best_values, best_index
