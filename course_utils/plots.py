"""Figure helpers in the captum style: each returns ``(fig, ax)`` and draws nothing else.

Images are float tensors [B, 3, H, W] in [0, 1] (uint8 is accepted too);
masks are bool [B, H, W] and are drawn as contours, so the image stays visible.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_display(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] or uint8 -> [H, W, 3] float array for ``imshow``."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image.float().clamp(0, 1).permute(1, 2, 0).numpy()


def image_grid(
    images: torch.Tensor,
    titles: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    ncols: int = 8,
    panel_size: float = 1.8,
    title_width: int = 22,
    mask_color: str = "white",
    row_labels: Sequence[str] | None = None,
) -> tuple[plt.Figure, np.ndarray]:
    """A grid of images with optional titles (wrapped) and mask contours.

    Args:
        images: [B, 3, H, W] float in [0, 1] or uint8.
        titles: B strings (e.g. captions or class names).
        masks: bool [B, H, W]; the outline of each mask is drawn on its image.
        row_labels: one label per row, written left of it.
    Returns:
        (fig, axes) with axes of shape [rows, ncols].
    """
    count = images.shape[0]
    if count == 0:
        raise ValueError("image_grid got no images to show (an empty selection?)")
    if titles is not None and len(titles) != count:
        raise ValueError(f"got {len(titles)} titles for {count} images")
    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    wrap = max(1, int(title_width * panel_size / 1.8))
    title_lines = max((len(textwrap.wrap(t, wrap)) for t in titles), default=0) if titles is not None else 0
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, (panel_size + 0.17 * title_lines) * nrows), squeeze=False
    )
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= count:
            continue
        ax.imshow(to_display(images[index]), interpolation="nearest")
        if masks is not None:
            ax.contour(masks[index].cpu().float().numpy(), levels=[0.5], colors=mask_color, linewidths=1.0)
        if titles is not None:
            ax.set_title("\n".join(textwrap.wrap(titles[index], wrap)), fontsize=8)
    if row_labels is not None:
        _label_rows(axes, row_labels)
    fig.tight_layout()
    return fig, axes


_LABEL_CHARS_PER_INCH = 13  # characters of a 9-point label that fit along one inch


def _label_rows(axes: np.ndarray, row_labels: Sequence[str]) -> None:
    """Write one label left of each row of an [rows, cols] axes grid, wrapped to the row's height."""
    if len(row_labels) != axes.shape[0]:
        raise ValueError(f"got {len(row_labels)} row labels for {axes.shape[0]} rows")
    for label, ax in zip(row_labels, axes[:, 0]):
        row_inches = ax.figure.get_figheight() / axes.shape[0]
        label = "\n".join(textwrap.wrap(label, max(8, int(row_inches * _LABEL_CHARS_PER_INCH)),
                                         break_long_words=False)) or label
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, fontsize=9)


def saliency_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    titles: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    ncols: int = 8,
    row_labels: Sequence[str] | None = None,
    panel_size: float = 1.6,
    alpha: float = 0.55,
    cmap: str = "inferno",
    colorbar_label: str = "importance (each map scaled to its max)",
) -> tuple[plt.Figure, np.ndarray]:
    """Saliency maps over their images, one panel each, with a shared colour bar.

    Each map is scaled to [0, 1] on its own (its maximum is 1), so panels compare *where* a map
    points, not how strong it is.

    Args:
        images: [B, 3, H, W] float in [0, 1] or uint8; maps: [B, H, W] (any real values).
        titles: B strings; masks: bool [B, H, W], drawn as contours (the ground truth).
        row_labels: one label per row, written left of it (e.g. the method of each row).
        colorbar_label: what the maps show (e.g. "importance and uncertainty, each scaled to its max").
    Returns:
        (fig, axes) with axes of shape [rows, ncols].
    """
    if maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"need one [H, W] map per image: images {tuple(images.shape)}, maps {tuple(maps.shape)}")
    fig, axes = image_grid(images, titles=titles, masks=masks, ncols=ncols, panel_size=panel_size,
                           mask_color="cyan", row_labels=row_labels)
    maps = maps.detach().float().cpu()
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    scaled = ((maps - low) / (high - low).clamp(min=1e-12)).numpy()
    artist = None
    for index, ax in enumerate(axes.flat[: maps.shape[0]]):
        artist = ax.imshow(scaled[index], cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
    fig.colorbar(artist, ax=axes, shrink=0.8, pad=0.01, label=colorbar_label)
    return fig, axes


def frequency_plot(result, ax: plt.Axes | None = None) -> tuple[plt.Figure, plt.Axes]:
    """Thesis Fig. 3.1: activation frequencies A_j of a ``QScoreResult``, sorted, with the band of
    discriminative features shaded and the never-active / rare / frequent features coloured."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.5))
    order = torch.argsort(result.frequency, descending=True)
    frequency = result.frequency[order].numpy()
    discriminative = result.discriminative[order].numpy()
    rank = np.arange(len(frequency))
    low, high = result.bounds
    categories = [("frequent (> P_high)", frequency > high, "tab:red"),
                  ("discriminative D", discriminative, "tab:green"),
                  ("rare (< P_low)", (frequency > 0) & (frequency < low), "tab:orange"),
                  ("never active", frequency == 0, "tab:gray")]
    for label, chosen, color in categories:
        ax.bar(rank[chosen], frequency[chosen], width=1.0, color=color, label=f"{label}: {int(chosen.sum())}")
    if np.isfinite(low):
        ax.axhspan(low, high, color="tab:green", alpha=0.12)
    ax.set_xlabel("feature j, sorted by activation frequency")
    ax.set_ylabel("A_j: % of samples where j is highly active")
    ax.legend(fontsize=8)
    return fig, ax


def word_score_plot(scores: dict[str, float], discarded: Sequence[str] = (), top: int = 10,
                    ax: plt.Axes | None = None, title: str | None = None) -> tuple[plt.Figure, plt.Axes]:
    """FALCON's Word Scores (eq. 4.1) as horizontal bars, best at the top; words that the contrastive step
    discarded are drawn grey and hatched."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4, 0.3 * top + 0.8))
    chosen = list(scores.items())[:top]
    if not chosen:
        raise ValueError("no word scores to plot")
    names = [w for w, _ in chosen][::-1]
    values = [v for _, v in chosen][::-1]
    dropped = set(discarded)
    colors = ["lightgray" if w in dropped else "tab:blue" for w in names]
    bars = ax.barh(names, values, color=colors)
    for bar, word in zip(bars, names):
        if word in dropped:
            bar.set_hatch("//")
    ax.set_xlabel("Word Score WS(w)")
    if dropped & set(names):
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:blue"),
                           plt.Rectangle((0, 0), 1, 1, facecolor="lightgray", hatch="//")],
                  labels=["concept", "discarded (lowly activating)"], fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    return fig, ax


def figures_dir() -> Path:
    """Where notebooks write their figures: ``COURSE_FIGURES_DIR`` or ``<repo>/figures``."""
    default = Path(__file__).resolve().parents[1] / "figures"
    return Path(os.environ.get("COURSE_FIGURES_DIR", default))


def save_figure(fig: plt.Figure, name: str, dpi: int = 150) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` (creating folders) and return the path.

    ``name`` is a plain file name, optionally under one notebook folder (``"00_welcome/views"``, as
    the notebooks use).

    Raises:
        ValueError: ``name`` is absolute, uses backslashes, ``..``/``.`` or empty parts, nests
            deeper than one folder, or resolves outside the figures folder.
    """
    parts = str(name).split("/")
    if (not isinstance(name, str) or name.startswith("/") or "\\" in name or len(parts) > 2
            or any(part in ("", ".", "..") for part in parts) or Path(name).is_absolute()):
        raise ValueError(f"save_figure needs a plain file name such as 'loss_curve' or '01_simclr/loss_curve' "
                         f"(no absolute path, '..' or deeper folders), got {name!r}; use a plain file name.")
    root = figures_dir().resolve()
    path = figures_dir() / f"{name}.png"
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"save_figure name {name!r} resolves outside the figures folder {root}; "
                         "use a plain file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
