"""ShapesWorld: the embedded, procedurally generated data set with ground truth.

Every image shows one labelled object (the class is its *shape*) with nuisance
attributes — colour, texture, size, position, rotation, background — and,
optionally, a small distractor bar.  Because the generator knows where it drew
the object, every image comes with a per-pixel mask, attribute labels and a
template caption, so explanations can be *scored* against ground truth.

Rendering is vectorised: all samples of a block are drawn at once as signed
distance fields on a supersampled grid and averaged down (anti-aliasing).
Sample ``i`` depends only on ``(seed, split, i)``: random numbers are drawn per
fixed-size block from a generator seeded by ``(seed, split, block index)``, so
``ShapesWorld(n=100)`` is exactly the first 100 samples of
``ShapesWorld(n=1000)``.  Only the samples asked for are rendered, chunk by chunk, straight into
the preallocated output, and a request whose memory would exceed ``MAX_MEMORY_BYTES`` is refused
before anything is allocated.

``select_samples(world, shape="star", color="red")`` picks samples by attribute value names.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "crescent", "ring")
OBJECT_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.97, 0.90, 0.10),
    "green": (0.15, 0.80, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.20, 0.40, 1.00),
    "purple": (0.62, 0.25, 1.00),
    "pink": (1.00, 0.45, 0.75),
}
# Dark, muted background colours (every channel <= 0.6), named with words that
# never name an object colour, so captions keep "object colour" and
# "background colour" apart.  One per class: the spurious variant pairs
# class k with background colour k.
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "navy": (0.08, 0.10, 0.38),
    "maroon": (0.42, 0.06, 0.10),
    "forest": (0.08, 0.32, 0.12),
    "olive": (0.38, 0.38, 0.06),
    "teal": (0.04, 0.34, 0.36),
    "plum": (0.32, 0.10, 0.36),
    "brown": (0.44, 0.27, 0.10),
    "slate": (0.28, 0.30, 0.36),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noisy", "textured")
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
)
SPLITS: tuple[str, ...] = ("train", "test", "val")
ANY = "any"  # the filter value of select_samples that leaves an attribute free

_BLOCK = 512  # samples drawn from one generator; fixed, so the prefix property holds
_SUPERSAMPLE = 2  # sub-pixels per pixel and axis used for anti-aliasing
_RENDER_POINTS = 2**22  # sub-pixels rendered at once (bounds memory for large images)

MAX_MEMORY_BYTES = 4 * 2**30
"""The most memory (bytes) one ``ShapesWorld`` may need: 4 GiB.  The estimate
(``ShapesWorld.memory_estimate``) counts what the data set keeps — uint8 images (3·size² bytes per
image), the two bool masks (2·size²), attributes, geometry and captions — plus the working memory of
rendering one chunk.  ``ShapesWorld(n, size)`` raises ValueError before allocating when the estimate
exceeds it (``n = 10**9`` at 32 px, or one image of 16,384 px, would need terabytes or tens of GB)."""

# Bytes per sample besides the pixels: 9 int64 attributes, 4 float32 geometry values, a caption.
_SAMPLE_OVERHEAD_BYTES = 9 * 8 + 4 * 4 + 128
# Working float32 maps while rendering one chunk: at sub-pixel resolution (coverage, rotated
# coordinates, distance temporaries) and at pixel resolution (background, composite, noise).
_WORK_SUBPIXEL_MAPS = 8
_WORK_PIXEL_MAPS = 16


@dataclass(frozen=True)
class Difficulty:
    """Knobs of one difficulty level; sizes are fractions of the image side."""

    radius: tuple[float, float]
    textures: tuple[str, ...]
    backgrounds: tuple[str, ...]
    noise_std: float
    distractor_p: float


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty((6 / 32, 9 / 32), ("solid",), ("plain",), 0.0, 0.0),
    "default": Difficulty((5 / 32, 8 / 32), ("solid", "striped"), ("plain", "gradient"), 0.02, 0.0),
    "hard": Difficulty((3.5 / 32, 6 / 32), TEXTURES, BACKGROUNDS, 0.06, 0.5),
}


# --------------------------------------------------------------------------
# Signed distance functions in unit coordinates (each shape fits the unit disc).
# x, y: float tensors of any (equal) shape, x to the right, y downwards;
# returns the signed distance (< 0 inside) in the same shape.
# --------------------------------------------------------------------------

def _sd_circle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.hypot(x, y) - 0.85


def _sd_box(x: torch.Tensor, y: torch.Tensor, half_x: float, half_y: float) -> torch.Tensor:
    qx, qy = x.abs() - half_x, y.abs() - half_y
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _sd_box(x, y, 0.66, 0.66)


def _sd_cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_sd_box(x, y, 0.94, 0.3), _sd_box(x, y, 0.3, 0.94))


def _sd_star_polygon(x: torch.Tensor, y: torch.Tensor, points: int, inner_angle: float) -> torch.Tensor:
    """Exact SDF of a regular star with outer radius 1 (a polygon when inner_angle = pi/2).

    After Inigo Quilez's ``sdStar``: fold the plane into one sector, then take
    the distance to the single edge in that sector.
    """
    sector = math.pi / points
    acs = (math.cos(sector), math.sin(sector))
    ecs = (math.cos(inner_angle), math.sin(inner_angle))
    x, y = x.abs(), -y  # first point straight up
    folded = torch.remainder(torch.atan2(x, y), 2 * sector) - sector
    radius = torch.hypot(x, y)
    qx = radius * torch.cos(folded) - acs[0]
    qy = radius * torch.sin(folded).abs() - acs[1]
    t = (-(qx * ecs[0] + qy * ecs[1])).clamp(0.0, acs[1] / ecs[1])
    qx, qy = qx + t * ecs[0], qy + t * ecs[1]
    return torch.hypot(qx, qy) * torch.sign(qx)


def _sd_triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _sd_star_polygon(x, y, 3, math.pi / 2)


def _sd_star(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _sd_star_polygon(x, y, 5, math.pi / 3.2)


def _sd_heart(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact heart SDF (Inigo Quilez), tip down, rescaled to fit the unit disc."""
    scale = 0.71  # the heart spans x in [-0.6, 0.6], y in [0, 1.1]: radius 0.67 around (0, 0.55)
    hx = x.abs() * scale
    hy = 0.55 - y * scale
    lobe = torch.hypot(hx - 0.25, hy - 0.75) - math.sqrt(2) / 4
    s = (hx + hy).clamp(min=0) * 0.5
    body = torch.sqrt(torch.minimum(hx**2 + (hy - 1) ** 2, (hx - s) ** 2 + (hy - s) ** 2)) * torch.sign(hx - hy)
    return torch.where(hx + hy > 1.0, lobe, body) / scale


def _sd_crescent(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    outer = torch.hypot(x, y) - 0.9
    bite = torch.hypot(x - 0.42, y) - 0.74
    return torch.maximum(outer, -bite)


def _sd_ring(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(x, y) - 0.68).abs() - 0.24


_SDF = {
    "circle": _sd_circle,
    "square": _sd_square,
    "triangle": _sd_triangle,
    "star": _sd_star,
    "cross": _sd_cross,
    "heart": _sd_heart,
    "crescent": _sd_crescent,
    "ring": _sd_ring,
}


def _sd_bar(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distractor: a capsule from (-1, 0) to (1, 0) with radius 0.22."""
    return torch.hypot(x - x.clamp(-1.0, 1.0), y) - 0.22


def _as_int(value) -> int | None:
    """``value`` as a Python int (Python and NumPy integers, anything with ``__index__``); None for
    other types and for bools."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _rows_per_chunk(size: int) -> int:
    """Images rendered at once: bounds the supersampled working maps to ``_RENDER_POINTS`` sub-pixels."""
    return max(1, _RENDER_POINTS // (size * _SUPERSAMPLE) ** 2)


def _skip_normal(g: torch.Generator, count: int) -> None:
    """Advance ``g`` as ``torch.randn(count, generator=g)`` would, in bounded memory (count % 16 == 0)."""
    step = _RENDER_POINTS  # a multiple of 16, so the chunks draw exactly what one call would
    buffer = torch.empty(min(step, count))
    for start in range(0, count, step):
        buffer[: min(step, count - start)].normal_(generator=g)


def _block_generator(seed: int, split: str, block: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, SPLITS.index(split), block]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(n: int, g: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _choice(n: int, options: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(options, (n,), generator=g)


class ShapesWorld(torch.utils.data.Dataset):
    """Procedural shapes with per-pixel masks, attributes and captions.

    Args:
        n: number of images (a Python or NumPy integer).
        size: image side in pixels (>= 32; a Python or NumPy integer).
        seed: seed of the sample stream (a Python or NumPy integer).
        split: "train", "test" or "val"; each split is an independent stream,
            and the spurious correlation applies to "train" only.
        spurious: probability p that the background colour agrees with the
            class in the train split (0 = no correlation).  In other splits the
            background colour is uniform.
        difficulty: "easy", "default" or "hard" (see ``DIFFICULTIES``).
        distractor_p: probability of a distractor bar beside the object; None
            takes the difficulty's value (0 for "easy" and "default", 0.5 for
            "hard").  Explanation notebooks set it to test whether a map lands
            on the bar.

    Raises:
        ValueError: a bad argument, or ``n`` and ``size`` whose memory would exceed
            ``MAX_MEMORY_BYTES`` (checked before anything is allocated).

    Attributes:
        images: uint8 [N, 3, S, S].
        labels: int64 [N] (the shape class).
        masks: bool [N, S, S], pixels of the labelled object.
        distractor_masks: bool [N, S, S], pixels of the distractor bar (if any).
        attributes: dict[str, int64 [N]] with keys shape, color, texture, size,
            position, background, background_color, distractor, distractor_color
            (0 = no distractor, else 1 + the index of its colour in OBJECT_COLORS).
        attribute_names: dict[str, list[str]], the value names of each attribute.
        geometry: dict[str, float [N]]: center_x, center_y, radius (pixels), angle (radians).
        captions: list[str], one template caption per image.
        classes: list[str], the shape names.
    """

    def __init__(
        self,
        n: int = 10_000,
        size: int = 32,
        seed: int = 0,
        split: str = "train",
        spurious: float = 0.0,
        difficulty: str = "default",
        distractor_p: float | None = None,
    ) -> None:
        if _as_int(n) is None or _as_int(n) < 1:
            raise ValueError(f"ShapesWorld needs n >= 1 images, got n={n!r}.")
        if _as_int(size) is None or _as_int(size) < 32:
            raise ValueError(f"ShapesWorld images must be at least 32 px (got size={size!r}); use size=32 or 64.")
        if _as_int(seed) is None or _as_int(seed) < 0:
            raise ValueError(f"ShapesWorld needs an integer seed >= 0, got seed={seed!r}.")
        n, size, seed = _as_int(n), _as_int(size), _as_int(seed)
        needed = self.memory_estimate(n, size)
        if needed > MAX_MEMORY_BYTES:
            raise ValueError(
                f"ShapesWorld(n={n}, size={size}) would need about {needed / 2**30:,.1f} GiB, more than "
                f"MAX_MEMORY_BYTES = {MAX_MEMORY_BYTES / 2**30:.0f} GiB; lower n or size "
                f"(at size={size} at most n={self.max_images(size):,} fit)."
            )
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
        if not 0.0 <= spurious <= 1.0:
            raise ValueError(f"spurious is a probability in [0, 1], got {spurious!r}.")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"Unknown difficulty {difficulty!r}; choose one of {tuple(DIFFICULTIES)}.")
        if distractor_p is None:
            distractor_p = DIFFICULTIES[difficulty].distractor_p
        if not 0.0 <= distractor_p <= 1.0:
            raise ValueError(f"distractor_p is a probability in [0, 1], got {distractor_p!r}.")
        self.distractor_p = float(distractor_p)
        self.n, self.size, self.seed, self.split = n, size, seed, split
        self.spurious, self.difficulty = float(spurious), difficulty
        self.classes = list(SHAPES)
        self.attribute_names: dict[str, list[str]] = {
            "shape": list(SHAPES),
            "color": list(OBJECT_COLORS),
            "texture": list(TEXTURES),
            "size": list(SIZES),
            "position": list(POSITIONS),
            "background": list(BACKGROUNDS),
            "background_color": list(BACKGROUND_COLORS),
            "distractor": ["none", "bar"],
            "distractor_color": ["none", *OBJECT_COLORS],
        }
        self.images = torch.empty(n, 3, size, size, dtype=torch.uint8)
        self.masks = torch.empty(n, size, size, dtype=torch.bool)
        self.distractor_masks = torch.empty(n, size, size, dtype=torch.bool)
        blocks = [self._render_block(b, min(_BLOCK, n - b * _BLOCK)) for b in range(math.ceil(n / _BLOCK))]
        self.attributes = {k: torch.cat([b["attributes"][k] for b in blocks]) for k in self.attribute_names}
        self.geometry = {k: torch.cat([b["geometry"][k] for b in blocks]) for k in blocks[0]["geometry"]}
        self.labels = self.attributes["shape"]
        self.captions = [self._caption(i) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns (float [3, S, S] in [0, 1], int label)."""
        return self.images[index].float() / 255.0, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"ShapesWorld(n={self.n}, size={self.size}, seed={self.seed}, split={self.split!r}, "
            f"spurious={self.spurious}, difficulty={self.difficulty!r}, distractor_p={self.distractor_p})"
        )

    @staticmethod
    def memory_estimate(n: int, size: int) -> int:
        """Bytes that ``ShapesWorld(n, size)`` needs: the stored samples plus one render chunk's work."""
        pixels = size * size
        stored = n * (5 * pixels + _SAMPLE_OVERHEAD_BYTES)  # uint8 images (3) + two bool masks (2)
        rows = min(n, _rows_per_chunk(size))
        working = rows * 4 * (_WORK_SUBPIXEL_MAPS * pixels * _SUPERSAMPLE**2 + _WORK_PIXEL_MAPS * 3 * pixels)
        return stored + working

    @classmethod
    def max_images(cls, size: int) -> int:
        """The largest n with ``memory_estimate(n, size) <= MAX_MEMORY_BYTES`` (0 if none)."""
        low, high = 0, MAX_MEMORY_BYTES
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cls.memory_estimate(mid, size) <= MAX_MEMORY_BYTES else (low, mid - 1)
        return low

    # ------------------------------------------------------------------
    def _caption(self, i: int) -> str:
        name = {k: self.attribute_names[k][int(v[i])] for k, v in self.attributes.items()}
        texture = "" if name["texture"] == "solid" else name["texture"] + " "
        background = {
            "plain": f"plain {name['background_color']}",
            "gradient": f"{name['background_color']} gradient",
            "noisy": f"noisy {name['background_color']}",
            "textured": f"textured {name['background_color']}",
        }[name["background"]]
        caption = f"a {name['size']} {name['color']} {texture}{name['shape']} on a {background} background"
        if name["distractor"] == "bar":
            caption += f" next to a {name['distractor_color']} bar"
        return caption

    def _draw_parameters(self, g: torch.Generator, count: int, with_noise: bool = True) -> dict[str, torch.Tensor]:
        """All random choices of one block (independent of n).

        The pixel noise is drawn last (``noise``, then ``bg_noise``); ``with_noise=False`` leaves both out
        (None) and ``g`` positioned at the first noise draw, so that ``_render_block`` can draw them
        chunk by chunk."""
        cfg = DIFFICULTIES[self.difficulty]
        n_bg_colors = len(BACKGROUND_COLORS)
        shape = _choice(count, len(SHAPES), g)
        color = _choice(count, len(OBJECT_COLORS), g)
        texture = torch.tensor([TEXTURES.index(t) for t in cfg.textures])[_choice(count, len(cfg.textures), g)]
        background = torch.tensor([BACKGROUNDS.index(b) for b in cfg.backgrounds])[
            _choice(count, len(cfg.backgrounds), g)
        ]
        size_class = _choice(count, len(SIZES), g)
        r_lo, r_hi = (f * self.size for f in cfg.radius)
        radius = r_lo + (r_hi - r_lo) * (size_class + _uniform(count, g)) / len(SIZES)
        # Uniform centre such that the whole object lies inside the image.
        margin = radius + 1.0
        center_x = margin + (self.size - 2 * margin) * _uniform(count, g)
        center_y = margin + (self.size - 2 * margin) * _uniform(count, g)
        angle = _uniform(count, g, 0.0, 2 * math.pi)
        # Background colour: agrees with the class with probability p in train.
        agree = _uniform(count, g) < (self.spurious if self.split == "train" else 0.0)
        other = (shape % n_bg_colors + 1 + _choice(count, n_bg_colors - 1, g)) % n_bg_colors
        uniform_bg = _choice(count, n_bg_colors, g)
        correlated = self.split == "train" and self.spurious > 0
        background_color = torch.where(agree, shape % n_bg_colors, other) if correlated else uniform_bg
        gradient_angle = _uniform(count, g, 0.0, 2 * math.pi)
        texture_phase = _uniform(count, g)
        # Distractor bar: placed so that it never overlaps the object.
        wants_distractor = _uniform(count, g) < self.distractor_p
        bar_half = 0.55 * radius
        candidates = 16
        cand = _uniform(count * candidates * 2, g).view(count, candidates, 2)
        lo = bar_half[:, None, None] + 1.0
        cand = lo + (self.size - 2 * lo) * cand
        centre = torch.stack([center_x, center_y], dim=-1)[:, None, :]
        clear = (cand - centre).norm(dim=-1) > radius[:, None] + bar_half[:, None] + 1.5
        first = clear.float().argmax(dim=1)
        distractor = wants_distractor & clear.any(dim=1)
        bar_xy = cand[torch.arange(count), first]
        bar_angle = _uniform(count, g, 0.0, math.pi)
        bar_color = (color + 1 + _choice(count, len(OBJECT_COLORS) - 1, g)) % len(OBJECT_COLORS)
        noise = torch.randn(count, 3, self.size, self.size, generator=g) if with_noise and cfg.noise_std > 0 else None
        bg_noise = (
            torch.randn(count, 3, self.size, self.size, generator=g)
            if with_noise and "noisy" in cfg.backgrounds else None
        )
        cx_third = ((center_x - margin) / (self.size - 2 * margin) * 3).long().clamp(0, 2)
        cy_third = ((center_y - margin) / (self.size - 2 * margin) * 3).long().clamp(0, 2)
        return dict(
            shape=shape, color=color, texture=texture, background=background, size=size_class,
            radius=radius, center_x=center_x, center_y=center_y, angle=angle,
            background_color=background_color, gradient_angle=gradient_angle, texture_phase=texture_phase,
            distractor=distractor.long(), bar_half=bar_half, bar_x=bar_xy[:, 0], bar_y=bar_xy[:, 1],
            bar_angle=bar_angle, bar_color=bar_color, distractor_color=(bar_color + 1) * distractor, noise=noise, bg_noise=bg_noise,
            position=cy_third * 3 + cx_third,
        )

    def _render_block(self, block: int, rows: int) -> dict:
        """Render the first ``rows`` samples of ``block`` into ``self.images``/``masks``; returns their
        attributes and geometry.

        The parameters of the whole block are drawn (cheap), but pixel noise only for the rows
        rendered, chunk by chunk: ``randn`` fills a tensor from consecutive draws of the generator
        (in groups of 16, and every chunk holds a multiple of 16 values), so consecutive chunks give
        the values of one block-sized draw.  ``bg_noise`` followed the whole block's ``noise`` in
        the stream, so its generator is a copy advanced past that many draws.
        """
        g = _block_generator(self.seed, self.split, block)
        prm = self._draw_parameters(g, _BLOCK, with_noise=False)
        cfg = DIFFICULTIES[self.difficulty]
        shape = (3, self.size, self.size)
        noise_g = g if cfg.noise_std > 0 else None
        bg_g = None
        if "noisy" in cfg.backgrounds:
            bg_g = torch.Generator().set_state(g.get_state())
            if noise_g is not None:
                _skip_normal(bg_g, _BLOCK * math.prod(shape))
        per_chunk = _rows_per_chunk(self.size)
        first = block * _BLOCK
        for start in range(0, rows, per_chunk):
            stop = min(start + per_chunk, rows)
            chunk = {k: (v[start:stop] if v is not None else None) for k, v in prm.items()}
            chunk["noise"] = torch.randn(stop - start, *shape, generator=noise_g) if noise_g is not None else None
            chunk["bg_noise"] = torch.randn(stop - start, *shape, generator=bg_g) if bg_g is not None else None
            img, mask, bar_mask = self._render(chunk)
            self.images[first + start:first + stop] = img
            self.masks[first + start:first + stop] = mask
            self.distractor_masks[first + start:first + stop] = bar_mask
        attributes = {k: prm[k][:rows] for k in self.attribute_names}
        geometry = {k: prm[k][:rows] for k in ("center_x", "center_y", "radius", "angle")}
        return dict(attributes=attributes, geometry=geometry)

    def _render(self, prm: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Render a chunk: returns uint8 [B, 3, S, S] and two bool masks [B, S, S].

        Only coverage maps are computed on the supersampled grid; compositing
        is linear in them, so it runs on the average-pooled maps at pixel
        resolution (exact, and 4x less work).
        """
        cfg = DIFFICULTIES[self.difficulty]
        count, size, ss = prm["shape"].shape[0], self.size, _SUPERSAMPLE
        grid = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss  # sub-pixel centres in pixels

        def local(idx, cx, cy, angle, scale):
            """Sub-pixel coordinates of samples idx in each object's rotated unit frame: 2 x [b, G, G].

            The rotation is separable: u = a(column) + b(row), so each full-size
            map costs one broadcast addition.
            """
            cos, sin = torch.cos(angle[idx])[:, None], torch.sin(angle[idx])[:, None]
            dx = (grid[None] - cx[idx][:, None]) / scale[idx][:, None]  # [b, G]
            dy = (grid[None] - cy[idx][:, None]) / scale[idx][:, None]
            u = (cos * dx)[:, None, :] + (sin * dy)[:, :, None]
            v = (-sin * dx)[:, None, :] + (cos * dy)[:, :, None]
            return u, v

        def coverage(distance, idx, scale):
            """Anti-aliased coverage of each sub-pixel from the signed distance in unit coordinates."""
            return (0.5 - distance * (scale[idx] * ss)[:, None, None]).clamp_(0.0, 1.0)

        def pool(t: torch.Tensor) -> torch.Tensor:  # [B, G, G] -> [B, S, S]
            return F.avg_pool2d(t[:, None], ss)[:, 0]

        alpha = torch.empty(count, size * ss, size * ss)
        pattern_alpha = torch.zeros(count, size, size)
        for k, name in enumerate(SHAPES):
            idx = (prm["shape"] == k).nonzero(as_tuple=True)[0]
            if not idx.numel():
                continue
            u, v = local(idx, prm["center_x"], prm["center_y"], prm["angle"], prm["radius"])
            alpha[idx] = coverage(_SDF[name](u, v), idx, prm["radius"])
            for t in range(1, len(TEXTURES)):
                sub = (prm["texture"][idx] == t).nonzero(as_tuple=True)[0]
                if sub.numel():
                    pattern = self._texture(TEXTURES[t], u[sub], v[sub], prm["texture_phase"][idx[sub]])
                    pattern_alpha[idx[sub]] = pool(pattern * alpha[idx[sub]])
        object_alpha = pool(alpha)  # [B, S, S]
        masks = object_alpha >= 0.5

        bar_alpha = torch.zeros(count, size, size)
        has_bar = prm["distractor"].bool().nonzero(as_tuple=True)[0]
        if has_bar.numel():
            u, v = local(has_bar, prm["bar_x"], prm["bar_y"], prm["bar_angle"], prm["bar_half"])
            bar_alpha[has_bar] = pool(coverage(_sd_bar(u, v), has_bar, prm["bar_half"]))
        bar_masks = bar_alpha >= 0.5

        # Background at pixel resolution (it is smooth).
        pix = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        ga = prm["gradient_angle"][:, None, None]
        ramp = (torch.cos(ga) * (pix[None, None, :] - 0.5) + torch.sin(ga) * (pix[None, :, None] - 0.5)) / math.sqrt(2)
        ramp = ramp + 0.5  # [B, S, S] in [0, 1]
        weave = 0.5 + 0.25 * (torch.sin(10 * math.pi * pix)[None, :] + torch.sin(10 * math.pi * pix)[:, None])
        kind = prm["background"][:, None, None]
        shade = torch.where(kind == 1, 0.55 + 0.45 * ramp, torch.where(kind == 3, 0.7 + 0.3 * weave, 1.0))
        bg = torch.tensor(list(BACKGROUND_COLORS.values()))[prm["background_color"]][:, :, None, None]
        img = bg * shade[:, None]  # [B, 3, S, S]
        if prm["bg_noise"] is not None:
            noisy = (prm["background"] == 2).float()[:, None, None, None]
            img = img + 0.1 * prm["bg_noise"] * noisy

        # Composite: image = bg (1 - a) + colour a, with the object's two tones.
        palette = torch.tensor(list(OBJECT_COLORS.values()))
        bar_rgb = palette[prm["bar_color"]][:, :, None, None]
        img = img + (bar_rgb - img) * bar_alpha[:, None]
        base = palette[prm["color"]][:, :, None, None]
        light = 0.5 * base + 0.5
        img = img * (1 - object_alpha[:, None]) + base * object_alpha[:, None] + (light - base) * pattern_alpha[:, None]
        if prm["noise"] is not None:
            img = img + cfg.noise_std * prm["noise"]
        images = (img.clamp_(0, 1) * 255).round_().to(torch.uint8)
        return images, masks, bar_masks

    @staticmethod
    def _texture(name: str, u: torch.Tensor, v: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Second-tone indicator in [0, 1] of a texture in the object frame (period 0.6 radius)."""
        period = 0.6
        tu = u / period + phase[:, None, None]
        tv = v / period
        if name == "striped":
            return (torch.remainder(tu, 1.0) < 0.5).float()
        if name == "dotted":
            return ((torch.remainder(tu, 1.0) - 0.5) ** 2 + (torch.remainder(tv, 1.0) - 0.5) ** 2 < 0.09).float()
        return torch.remainder(torch.floor(tu) + torch.floor(tv), 2.0)


def select_samples(world: ShapesWorld, limit: int | None = None, **filters: str) -> torch.Tensor:
    """Indices of the images whose attributes have the given value names.

    Example: ``select_samples(world, shape="star", color="red")``; ``"any"``
    leaves an attribute free.

    Returns:
        LongTensor [k] of indices (at most ``limit``), in data set order.
    """
    keep = torch.ones(len(world), dtype=torch.bool)
    for attribute, value in filters.items():
        if value == ANY:
            continue
        if attribute not in world.attribute_names:
            raise ValueError(f"unknown attribute {attribute!r}; choose from {sorted(world.attribute_names)}")
        names = world.attribute_names[attribute]
        if value not in names:
            raise ValueError(f"{attribute} has no value {value!r}; its values are {names}")
        keep &= world.attributes[attribute] == names.index(value)
    indices = keep.nonzero(as_tuple=True)[0]
    return indices if limit is None else indices[:limit]
