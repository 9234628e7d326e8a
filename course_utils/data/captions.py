"""Varied captions for ShapesWorld images, and the caption set S that FALCON retrieves from.

FALCON explains a feature by the captions a vision-language model retrieves for its highly activating
images.  With fully templated captions an image's top captions are near-duplicates differing in one
slot, and the word scores of eq. 4.1 cannot tell the slots apart.  So captions here vary the way people
write: they mention only some attributes, use synonyms, change the word order, say where the object is,
and the set S also holds captions about unrelated scenes, so retrieval is not trivial.

``describe(names, rng)`` writes one caption of an image from its attribute value names;
``caption_set(n, seed)`` builds S (distinct captions), ``load_caption_set()`` reads the committed one.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Mapping

CAPTION_FILE = Path(__file__).resolve().parents[2] / "data" / "captions" / "shapes_captions.txt"

SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"], "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge"], "star": ["star"], "cross": ["cross", "plus sign"],
    "heart": ["heart"], "crescent": ["crescent", "moon"], "ring": ["ring", "hoop", "donut"],
}
TEXTURE_WORDS = {"solid": ["", "", "solid", "plain"], "striped": ["striped", "stripy"],
                 "dotted": ["dotted", "spotted"], "checkered": ["checkered", "chequered"]}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "medium": ["medium", "mid-sized"],
              "large": ["large", "big"]}
POSITION_WORDS = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
                  "left": "on the left", "centre": "in the centre", "right": "on the right",
                  "bottom left": "in the bottom left", "bottom": "at the bottom",
                  "bottom right": "in the bottom right"}
BACKGROUND_WORDS = {"plain": ["plain", "flat"], "gradient": ["gradient", "fading"], "noisy": ["noisy", "grainy"],
                    "textured": ["textured"]}

_UNRELATED_SUBJECTS = ["dog", "cat", "horse", "bicycle", "car", "boat", "tree", "house", "bridge", "child",
                       "woman", "man", "bird", "cake", "guitar", "train", "mountain", "lamp", "chair", "clock",
                       "cow", "sheep", "bus", "plane", "kite", "umbrella", "sandwich", "laptop", "flower", "teapot"]
_UNRELATED_PLACES = ["on a beach", "in a park", "in the snow", "next to a window", "on a city street",
                     "in a kitchen", "under a bridge", "at night", "in the rain", "on a wooden table",
                     "in a field", "near a lake", "in a garage", "on a rooftop", "in a forest"]
_UNRELATED_ADJECTIVES = ["old", "young", "wet", "sleeping", "running", "wooden", "broken", "happy", "shiny", "busy",
                         "dusty", "tall", "muddy", "tired", "noisy", "quiet", "rusty", "fluffy", "lonely", "famous"]


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _object_phrase(names: Mapping[str, str], rng: random.Random) -> str:
    """"small red striped star", with some attributes left out and synonyms drawn."""
    words = []
    if _maybe(rng, 0.5):
        words.append(rng.choice(SIZE_WORDS[names["size"]]))
    if _maybe(rng, 0.85):
        words.append(names["color"])
    texture = rng.choice(TEXTURE_WORDS[names["texture"]])
    if texture and _maybe(rng, 0.7):
        words.append(texture)
    words.append(rng.choice(SHAPE_WORDS[names["shape"]]))
    return " ".join(words)


def _background_phrase(names: Mapping[str, str], rng: random.Random) -> str:
    """"teal gradient background" / "a grainy olive backdrop" variants."""
    colour = names["background_color"]
    style = rng.choice(BACKGROUND_WORDS[names["background"]]) if _maybe(rng, 0.5) else ""
    noun = rng.choice(["background", "background", "backdrop"])
    parts = [style, colour, noun] if _maybe(rng, 0.5) else [colour, style, noun]
    return " ".join(p for p in parts if p)


def describe(names: Mapping[str, str], rng: random.Random) -> str:
    """One caption of an image from its attribute value names (keys as ``ShapesWorld.attribute_names``:
    shape, color, texture, size, position, background, background_color, distractor, distractor_color)."""
    obj = _object_phrase(names, rng)
    article = _article(obj)
    where = POSITION_WORDS[names["position"]] if _maybe(rng, 0.35) else ""
    background = _background_phrase(names, rng) if _maybe(rng, 0.7) else ""
    bar = ""
    if names.get("distractor") == "bar" and _maybe(rng, 0.7):
        bar = f"{_article(names['distractor_color'])} {names['distractor_color']} bar" if _maybe(rng, 0.8) else "a bar"
    form = rng.randrange(6)
    if form == 0 or not background:
        text = f"{article} {obj}"
        text += f" {where}" if where else ""
        text += f" on {_article(background)} {background}" if background else ""
    elif form == 1:
        text = f"{_article(background)} {background} with {article} {obj}"
        text += f" {where}" if where else ""
    elif form == 2:
        text = f"there is {article} {obj}" + (f" {where}" if where else "") + f" on {_article(background)} {background}"
    elif form == 3:
        text = f"{obj}" + (f" {where}" if where else "") + f", {background}"
    elif form == 4:
        text = (f"{where}, " if where else "") + f"{article} {obj} against {_article(background)} {background}"
    else:
        text = f"a picture of {article} {obj}" + (f" {where}" if where else "") + f" on {_article(background)} {background}"
    if bar:
        text += rng.choice([f" next to {bar}", f" beside {bar}", f" and {bar}"])
    return " ".join(text.split())


def unrelated_caption(rng: random.Random) -> str:
    """A caption of a scene that is not in ShapesWorld ("an old dog on a beach")."""
    adjective = rng.choice(_UNRELATED_ADJECTIVES)
    return f"{_article(adjective)} {adjective} {rng.choice(_UNRELATED_SUBJECTS)} {rng.choice(_UNRELATED_PLACES)}"


def random_names(attribute_names: Mapping[str, list[str]], rng: random.Random) -> dict[str, str]:
    """A random combination of attribute values (a caption for an image that may not exist)."""
    names = {key: rng.choice(values) for key, values in attribute_names.items()}
    names["distractor"] = rng.choice(["none", "bar"])
    names["distractor_color"] = rng.choice([v for v in attribute_names["distractor_color"] if v != "none"])
    return names


def caption_set(attribute_names: Mapping[str, list[str]], n: int = 24_000, unrelated_share: float = 0.15,
                seed: int = 0) -> list[str]:
    """The caption set S: ``n`` distinct captions, ``unrelated_share`` of them about other scenes.

    Args:
        attribute_names: ``ShapesWorld.attribute_names`` (the vocabulary the captions cover).
    Returns:
        sorted list of n distinct strings (deterministic for a seed).
    """
    rng = random.Random(seed)
    related_target = n - round(n * unrelated_share)
    related: set[str] = set()
    while len(related) < related_target:
        related.add(describe(random_names(attribute_names, rng), rng))
    return sorted(related | _unrelated_captions(n - related_target, rng))


def _unrelated_captions(count: int, rng: random.Random) -> set[str]:
    """``count`` distinct unrelated captions (a clear error when fewer exist)."""
    max_unrelated = len(_UNRELATED_ADJECTIVES) * len(_UNRELATED_SUBJECTS) * len(_UNRELATED_PLACES)
    if count > max_unrelated:
        raise ValueError(f"at most {max_unrelated} distinct unrelated captions exist; lower unrelated_share")
    unrelated: set[str] = set()
    while len(unrelated) < count:
        unrelated.add(unrelated_caption(rng))
    return unrelated


def concept_names(attribute_names: Mapping[str, list[str]]) -> dict[str, set[str]]:
    """Which attribute values a caption word can name: "hoop" -> {"ring"}, "fading" -> {"gradient"},
    "plain" -> {"solid", "plain"} (a texture and a background style), "bar" -> {"bar"}.

    Colour and shape names name themselves; the words of multi-word synonyms ("round dot", "plus sign")
    each name their value.  FALCON's automatic evaluation scores a concept word as correct when one of its
    values is a true concept of the feature.
    """
    names: dict[str, set[str]] = {}
    for table in (SHAPE_WORDS, TEXTURE_WORDS, SIZE_WORDS, BACKGROUND_WORDS):
        for value, phrases in table.items():
            for phrase in [value, *phrases]:
                for word in phrase.replace("-", " ").split():
                    names.setdefault(word, set()).add(value)
    for key in ("color", "background_color"):
        for value in attribute_names[key]:
            names.setdefault(value, set()).add(value)
    names.setdefault("bar", set()).add("bar")
    return names


def templated_caption_set(attribute_names: Mapping[str, list[str]], n: int = 24_000, unrelated_share: float = 0.15,
                          seed: int = 0) -> list[str]:
    """A caption set of one fixed template that names every attribute ("a small red striped star on a noisy
    navy background"), with the same share of unrelated captions as ``caption_set``: the contrast that shows
    why caption variety matters for eq. 4.1."""
    rng = random.Random(seed)
    related_target = n - round(n * unrelated_share)
    keys = ("size", "color", "texture", "shape", "background", "background_color")
    if related_target > math.prod(len(attribute_names[k]) for k in keys):
        raise ValueError(f"the template has fewer than {related_target} distinct captions; lower n")
    related: set[str] = set()
    while len(related) < related_target:
        v = {key: rng.choice(attribute_names[key]) for key in keys}
        related.add(f"a {v['size']} {v['color']} {v['texture']} {v['shape']} on a {v['background']} "
                    f"{v['background_color']} background")
    return sorted(related | _unrelated_captions(n - related_target, rng))


def load_caption_set(path: str | Path = CAPTION_FILE) -> list[str]:
    """The committed caption set S (one caption per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption set not found: {path}; rebuild it with "
                                "`python -m course_utils.data.captions` (or restore it from git)")
    captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return captions


if __name__ == "__main__":
    from course_utils.data.shapes import ShapesWorld
    from course_utils.models import atomic_write

    captions = caption_set(ShapesWorld(n=1, seed=0).attribute_names)
    CAPTION_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(CAPTION_FILE, lambda f: f.write(("\n".join(captions) + "\n").encode()))
    print(f"{len(captions)} distinct captions written to {CAPTION_FILE}")
