"""The caption set, the toy CLIP, the open_clip adapter, the text-embedding cache and chunked retrieval."""

import json
import random

import pytest
import torch

from course_utils.data.captions import caption_set, describe, load_caption_set
from course_utils.data.shapes import ShapesWorld
from course_utils.vlm import (
    OpenCLIP, ToyCLIP, Vocabulary, caption_embeddings, clip_loss, load_toy_clip, save_toy_clip, top_captions,
    train_toy_clip, words, zero_shot_accuracy,
)

NAMES = ShapesWorld(n=1, seed=0).attribute_names


def test_captions_vary_in_phrasing_order_and_detail():
    rng = random.Random(0)
    names = {"shape": "star", "color": "red", "texture": "striped", "size": "small", "position": "top left",
             "background": "plain", "background_color": "teal", "distractor": "bar", "distractor_color": "blue"}
    captions = {describe(names, rng) for _ in range(300)}
    assert len(captions) > 100  # the same image gets many different captions
    assert any(c.index("teal") < c.index("star") for c in captions if "teal" in c)  # background first
    assert any(c.index("star") < c.index("teal") for c in captions if "teal" in c)  # object first
    assert any("top left" in c for c in captions) and any("top left" not in c for c in captions)
    assert any("red" not in c for c in captions)  # attributes left out
    for caption in captions:
        assert "star" in caption or "teal" in caption  # it always says something about the image
        assert not any(f" a {v}" in f" {caption}" for v in "aeiou")  # "an orange", not "a orange"


def test_caption_set_is_distinct_deterministic_and_holds_unrelated_captions():
    first, second = caption_set(NAMES, n=3000, seed=1), caption_set(NAMES, n=3000, seed=1)
    assert first == second and len(set(first)) == 3000
    unrelated = [c for c in first if not any(s in c for s in ("circle", "square", "triangle", "star", "cross", "heart",
                                                                "crescent", "ring", "disc", "box", "block", "wedge",
                                                                "plus", "moon", "hoop", "donut", "dot"))]
    assert 300 <= len(unrelated) <= 600  # 15 % about other scenes
    vocabulary = {w for c in first for w in words(c)}
    for values in (NAMES["shape"], NAMES["color"], NAMES["background_color"], ["striped", "dotted", "checkered"]):
        assert set(values) <= vocabulary


def test_the_committed_caption_set_is_large_and_distinct():
    captions = load_caption_set()
    assert len(captions) >= 20_000 and len(set(captions)) == len(captions)
    with pytest.raises(FileNotFoundError, match="captions"):
        load_caption_set("/nonexistent/captions.txt")


def test_vocabulary_maps_unknown_words_and_pads():
    vocabulary = Vocabulary.from_texts(["a red star", "a blue ring"])
    tokens = vocabulary.encode(["a red unicorn", "ring"], max_length=4)
    assert tokens.shape == (2, 4)
    assert tokens[0, 2] == 1 and tokens[0, 3] == 0 and tokens[1, 1:].eq(0).all()
    assert vocabulary.words[tokens[1, 0]] == "ring"


@pytest.fixture(scope="module")
def tiny_clip():
    world = ShapesWorld(n=64, seed=0)
    vocabulary = Vocabulary.from_texts(caption_set(NAMES, n=500, seed=0))
    torch.manual_seed(0)
    return ToyCLIP(vocabulary, dim=16, width=8, text_dim=16, text_layers=1), world


def test_toy_clip_embeddings_are_normalised_and_see_word_order(tiny_clip):
    model, world = tiny_clip
    images = model.encode_images(world.images[:5].float() / 255)
    texts = model.encode_texts(["a red star on a blue background", "a blue star on a red background"])
    assert images.shape == (5, 16) and texts.shape == (2, 16)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))
    assert (texts[0] - texts[1]).abs().max() > 1e-4  # same words, different order, different embedding
    with pytest.raises(ValueError, match="list of strings"):
        model.encode_texts("a red star")
    with pytest.raises(ValueError, match="float"):
        model.encode_images(world.images[:2])


def test_clip_loss_is_low_for_matching_pairs_and_symmetric():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    scale = torch.tensor(3.0)
    assert clip_loss(x, x, scale) < clip_loss(x, torch.randn(8, 16, generator=g), scale)
    y = x + 0.1 * torch.randn(8, 16, generator=g)
    torch.testing.assert_close(clip_loss(x, y, scale), clip_loss(y, x, scale))


def _zero_shot_by_hand(model, world) -> float:
    """Shape by zero-shot classification, one image at a time: the shape whose mean prompt embedding
    ("a {colour} {shape}" over the colours, normalised) has the largest cosine with the image's embedding."""
    shapes, colours = world.attribute_names["shape"], world.attribute_names["color"]
    prototypes = [torch.nn.functional.normalize(model.encode_texts([f"a {c} {s}" for c in colours]).mean(0), dim=0)
                  for s in shapes]
    correct = 0
    for image, label in zip(world.images, world.attributes["shape"]):
        embedding = model.encode_images(image[None].float() / 255)[0]
        scores = [float(embedding @ p) for p in prototypes]
        correct += int(max(range(len(shapes)), key=scores.__getitem__) == int(label))
    return correct / len(world)


class _IndicatorVLM:
    """A stand-in whose image embedding is the one-hot of a given label per image and whose text embedding is
    the one-hot of the shape the prompt names: zero-shot accuracy is the share of the given labels that are
    the true ones."""

    def __init__(self, world, labels):
        self.shapes, self.labels = world.attribute_names["shape"], labels

    def encode_images(self, images):
        return torch.nn.functional.one_hot(self.labels[:len(images)], len(self.shapes)).float()

    def encode_texts(self, texts):
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(self.shapes.index(t.split()[-1])),
                                                        len(self.shapes)).float() for t in texts])


def test_zero_shot_accuracy_is_the_share_of_images_whose_named_shape_is_their_own():
    world = ShapesWorld(n=200, seed=2)
    truth = world.attributes["shape"]
    assert zero_shot_accuracy(_IndicatorVLM(world, truth), world, "shape") == 1.0
    wrong = truth.clone()
    wrong[::4] = (wrong[::4] + 1) % len(world.attribute_names["shape"])  # every 4th image named as another shape
    assert zero_shot_accuracy(_IndicatorVLM(world, wrong), world, "shape") == pytest.approx(0.75)


def test_a_short_toy_clip_training_lowers_the_loss_and_round_trips(tiny_clip, tmp_path):
    model, world = tiny_clip
    history = train_toy_clip(model, ShapesWorld(n=256, seed=0), epochs=3, batch_size=64, lr=3e-3, device="cpu",
                             progress=False)
    assert history.loss[-1] < history.loss[0]
    save_toy_clip(model, tmp_path / "clip.pt", note="test")
    loaded = load_toy_clip(tmp_path / "clip.pt")
    torch.testing.assert_close(loaded.encode_texts(["a red star"]), model.encode_texts(["a red star"]))
    assert loaded.metadata["note"] == "test" and loaded.fingerprint.startswith("toy-clip:")
    # the round trip keeps the classifier (the tiny model's text embeddings are nearly collapsed after 3 epochs, so
    # its accuracy is checked against an independent computation on the committed toy CLIP below)
    assert zero_shot_accuracy(loaded, world, "shape") == zero_shot_accuracy(model, world, "shape")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="toy CLIP"):
        load_toy_clip(tmp_path / "broken.pt")


def test_the_committed_toy_clip_classifies_shape_and_colour_zero_shot():
    """Measured on 5,000 test images: shape 0.98, colour 1.00, background colour 1.00 (target >= 0.9)."""
    from course_utils.models import checkpoint_dir

    model = load_toy_clip(checkpoint_dir() / "vlm" / "shapes-clip.pt")
    world = ShapesWorld(n=500, seed=1, split="test")
    assert zero_shot_accuracy(model, world, "shape") >= 0.9
    assert zero_shot_accuracy(model, world, "color") >= 0.9
    few = ShapesWorld(n=100, seed=1, split="test")  # the same number as a per-image computation by hand
    assert zero_shot_accuracy(model, few, "shape") == pytest.approx(_zero_shot_by_hand(model, few), abs=1e-6)


def test_top_captions_in_chunks_equal_a_full_sort():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    captions = torch.nn.functional.normalize(torch.randn(1000, 8, generator=g), dim=1)
    values, index = top_captions(images, captions, top_k=5, chunk=37)
    full = (images @ captions.T).topk(5, dim=1)
    torch.testing.assert_close(values, full.values)
    assert torch.equal(index, full.indices)
    with pytest.raises(ValueError, match="top_k"):
        top_captions(images, captions, top_k=0)


def test_caption_embeddings_are_cached_per_model_and_caption_set(tiny_clip, tmp_path):
    model, _ = tiny_clip
    calls = []
    original = model.encode_texts

    def counting(texts):
        calls.append(len(texts))
        return original(texts)

    model.encode_texts = counting
    try:
        first = caption_embeddings(model, ["a red star", "a blue ring"], cache_dir=tmp_path)
        again = caption_embeddings(model, ["a red star", "a blue ring"], cache_dir=tmp_path)
        other = caption_embeddings(model, ["a red star"], cache_dir=tmp_path)
    finally:
        del model.encode_texts
    assert calls == [2, 1]  # the second call came from the cache
    assert torch.equal(first, again) and other.shape == (1, 16)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    for path in tmp_path.glob("*.pt"):
        path.write_bytes(b"corrupt")
    torch.testing.assert_close(caption_embeddings(model, ["a red star", "a blue ring"], cache_dir=tmp_path), first)


def test_open_clip_adapter_runs_a_tiny_random_model_offline(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "course-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "course-tiny-clip.json")
    model = OpenCLIP("course-tiny-clip", random_init=True, device="cpu")
    images = model.encode_images(torch.rand(3, 3, 20, 20))
    texts = model.encode_texts(["a red star", "a blue ring"])
    assert images.shape == (3, 16) and texts.shape == (2, 16)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(3))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        OpenCLIP("course-tiny-clip")
    with pytest.raises(FileNotFoundError, match="not found"):
        OpenCLIP("course-tiny-clip", weights=tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="no model"):
        OpenCLIP("no-such-model", random_init=True)
