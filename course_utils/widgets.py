"""ipywidgets explorers.  Each widget's callback is a plain function of its
control values (``explorer_view`` …), so it can be tested without a browser.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from course_utils.data.augment import SimCLRAugment
from course_utils.data.shapes import ShapesWorld
from course_utils.plots import image_grid, saliency_grid

ANY = "any"
FILTERABLE = ("shape", "color", "texture", "size", "position", "background", "background_color", "distractor")


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


def explorer_view(
    worlds: Mapping[str, ShapesWorld], variant: str, show_masks: bool = True, count: int = 8, **filters: str
) -> tuple[plt.Figure | None, str]:
    """The explorer's callback: a figure of matching images and a summary line.

    Args:
        worlds: the data set variants to choose from, by name.
        variant: key of ``worlds``.
        show_masks: outline the labelled object's mask.
        count: how many images to show.
        filters: attribute -> value name (or "any").
    Returns:
        (fig, text); fig is None when nothing matches, and text says so.
    """
    world = worlds[variant]
    matches = select_samples(world, **filters)
    chosen = ", ".join(f"{k}={v}" for k, v in filters.items() if v != ANY) or "no filter"
    if matches.numel() == 0:
        return None, f"No image of {variant} matches {chosen}; loosen a filter."
    shown = matches[:count]
    fig, _ = image_grid(
        world.images[shown],
        titles=[world.captions[i] for i in shown.tolist()],
        masks=world.masks[shown] if show_masks else None,
        ncols=4,
        panel_size=2.2,
    )
    text = f"{matches.numel()} of {len(world)} images of {variant} match {chosen}; showing {shown.numel()}."
    return fig, text


def shapes_explorer(worlds: Mapping[str, ShapesWorld], count: int = 8) -> widgets.Widget:
    """Dropdowns for every attribute, a data-set variant selector and a mask toggle."""
    first = next(iter(worlds.values()))
    dropdowns = {
        name: widgets.Dropdown(options=[ANY, *first.attribute_names[name]], value=ANY, description=name)
        for name in FILTERABLE
    }
    variant = widgets.ToggleButtons(options=list(worlds), description="data set")
    show_masks = widgets.Checkbox(value=True, description="outline masks")
    summary = widgets.Label()
    output = widgets.Output()

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        fig, summary.value = explorer_view(
            worlds, variant.value, show_masks.value, count, **{k: d.value for k, d in dropdowns.items()}
        )
        with output:
            if fig is not None:
                plt.show()
                plt.close(fig)

    for control in (*dropdowns.values(), variant, show_masks):
        control.observe(refresh, names="value")
    refresh()
    controls = widgets.GridBox(
        list(dropdowns.values()), layout=widgets.Layout(grid_template_columns="repeat(4, 240px)")
    )
    return widgets.VBox([variant, controls, show_masks, summary, output])


AUGMENT_SLIDERS = {  # name -> (min, max, step, default): the course recipe for 32 px ShapesWorld
    "crop_min_scale": (0.05, 1.0, 0.05, 0.35),
    "flip_p": (0.0, 1.0, 0.1, 0.5),
    "jitter_p": (0.0, 1.0, 0.1, 0.8),
    "brightness": (0.0, 1.0, 0.1, 0.8),
    "contrast": (0.0, 1.0, 0.1, 0.8),
    "saturation": (0.0, 1.0, 0.1, 0.8),
    "hue": (0.0, 0.5, 0.05, 0.5),
    "grayscale_p": (0.0, 1.0, 0.1, 0.2),
    "blur_p": (0.0, 1.0, 0.1, 0.0),
}


def augmentation_view(images: torch.Tensor, seed: int = 0, crop_min_scale: float = 0.35,
                      **strengths: float) -> tuple[plt.Figure, torch.Tensor]:
    """The augmentation explorer's callback: each image next to two random views.

    Args:
        images: float [B, 3, S, S] in [0, 1].
        seed: seed of the views (the same seed redraws the same views).
        crop_min_scale, strengths: SimCLRAugment parameters (see ``AUGMENT_SLIDERS``).
    Returns:
        (fig, views float [2, B, 3, S, S]); rows of the figure: original, view 1, view 2.
    """
    augment = SimCLRAugment(images.shape[-1], crop_scale=(crop_min_scale, 1.0),
                            blur_sigma=(1.0 / 32, 2.0 / 32), **strengths)
    generator = torch.Generator().manual_seed(seed)
    views = torch.stack([augment(images, generator), augment(images, generator)])
    count = images.shape[0]
    titles = ["original"] * count + ["view 1"] * count + ["view 2"] * count
    fig, _ = image_grid(torch.cat([images, views[0], views[1]]), titles=titles, ncols=count, panel_size=1.5)
    return fig, views


def augmentation_explorer(images: torch.Tensor) -> widgets.Widget:
    """Sliders for every augmentation strength; shows each image with two views."""
    sliders = {
        name: widgets.FloatSlider(value=default, min=lo, max=hi, step=step, description=name,
                                  continuous_update=False)
        for name, (lo, hi, step, default) in AUGMENT_SLIDERS.items()
    }
    seed = widgets.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    output = widgets.Output()

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        with output:
            fig, _ = augmentation_view(images, seed.value, **{k: s.value for k, s in sliders.items()})
            plt.show()
            plt.close(fig)

    for control in (*sliders.values(), seed):
        control.observe(refresh, names="value")
    refresh()
    controls = widgets.GridBox(
        [*sliders.values(), seed], layout=widgets.Layout(grid_template_columns="repeat(3, 320px)"))
    return widgets.VBox([controls, output])


def saliency_explorer(
    images: torch.Tensor,
    masks: torch.Tensor,
    explain: Callable[[int, str, str, int], torch.Tensor],
    targets: Sequence[str],
    layers: Sequence[str],
    n_features: int,
) -> widgets.Widget:
    """Pick an image, a target, a layer and a feature index; shows the map over the image.

    Args:
        images: [N, 3, H, W] in [0, 1]; masks: bool [N, H, W] (drawn as the ground-truth outline).
        explain: ``explain(index, target, layer, feature) -> map [H, W]`` (e.g. a Grad-CAM call).
        targets, layers: the choices of the two drop-downs; n_features: range of the feature slider.
    """
    index = widgets.IntSlider(value=0, min=0, max=images.shape[0] - 1, description="image", continuous_update=False)
    target = widgets.Dropdown(options=list(targets), description="target")
    layer = widgets.Dropdown(options=list(layers), value=list(layers)[-1], description="layer")
    feature_index = widgets.IntSlider(value=0, min=0, max=n_features - 1, description="feature j",
                                      continuous_update=False)
    output = widgets.Output()

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        with output:
            i = index.value
            saliency = explain(i, target.value, layer.value, feature_index.value)
            fig, _ = saliency_grid(images[i:i + 1], saliency[None], masks=masks[i:i + 1], ncols=1, panel_size=3.0,
                                   titles=[f"{target.value} @ {layer.value}"])
            plt.show()
            plt.close(fig)

    for control in (index, target, layer, feature_index):
        control.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([index, target]), widgets.HBox([layer, feature_index]), output])
