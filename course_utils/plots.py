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
) -> tuple[plt.Figure, np.ndarray]:
    """A grid of images with optional titles (wrapped) and mask contours.

    Args:
        images: [B, 3, H, W] float in [0, 1] or uint8.
        titles: B strings (e.g. captions or class names).
        masks: bool [B, H, W]; the outline of each mask is drawn on its image.
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
    fig.tight_layout()
    return fig, axes


def figures_dir() -> Path:
    """Where notebooks write their figures: ``COURSE_FIGURES_DIR`` or ``<repo>/figures``."""
    default = Path(__file__).resolve().parents[1] / "figures"
    return Path(os.environ.get("COURSE_FIGURES_DIR", default))


def save_figure(fig: plt.Figure, name: str, dpi: int = 150) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` (creating folders) and return the path."""
    path = figures_dir() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
