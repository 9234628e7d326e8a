"""ipywidgets explorers.  Each widget's callback is a plain function of its
control values (``explorer_view`` …), so it can be tested without a browser.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from course_utils.data.augment import SimCLRAugment
from course_utils.data import shapes
from course_utils.data.shapes import ANY, ShapesWorld
from course_utils.explain.gradcam import representation
from course_utils.explain.qscore import qscore
from course_utils.explain.relax import masked_copies, relax_masks
from course_utils.metrics import auroc
from course_utils.plots import frequency_plot, image_grid, saliency_grid, to_display, word_score_plot

FILTERABLE = ("shape", "color", "texture", "size", "position", "background", "background_color", "distractor")


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
    matches = shapes.select_samples(world, **filters)
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
        name: widgets.Dropdown(options=[ANY, *first.attribute_names[name]], value=ANY, description=name,
                               style={"description_width": "125px"}, layout=widgets.Layout(width="250px"))
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
        list(dropdowns.values()), layout=widgets.Layout(grid_template_columns="repeat(4, 260px)")
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


FILLS = {"zeros (paper)": 0.0, "mean colour": "mean", "blurred image": "blur"}


def masking_view(encoder: torch.nn.Module, image: torch.Tensor, grid: int = 7, p_keep: float = 0.5,
                 fill: str = "zeros (paper)", seed: int = 0) -> tuple[plt.Figure, float]:
    """The masking explorer's callback: one RELAX mask, the masked image and its similarity.

    Args:
        encoder: maps [B, 3, H, W] in [0, 1] to h [B, r].
        image: float [3, H, W] in [0, 1].
        grid, p_keep: the mask's cells per side and keep probability (``relax_masks``).
        fill: a key of ``FILLS``: what masked-out pixels become.
        seed: which random mask.
    Returns:
        (fig, s) with s = cos(f(X), f(masked X)).
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {list(FILLS)}, got {fill!r}")
    device = next(encoder.parameters()).device
    mask = relax_masks(1, tuple(image.shape[-2:]), grid, p_keep, torch.Generator().manual_seed(seed), device)
    image = image.to(device, torch.float32)
    masked = masked_copies(image[None], mask, FILLS[fill])[0, 0]
    with torch.no_grad():
        h = representation(encoder(torch.stack([image, masked]))).float()
    similarity = torch.nn.functional.cosine_similarity(h[0], h[1], dim=0).item()
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    axes[0].imshow(to_display(image), interpolation="nearest")
    axes[0].set_title("image X")
    shown = axes[1].imshow(mask[0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"mask M ({grid}×{grid} cells, p = {p_keep:.2f})")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, label="keep")
    axes[2].imshow(to_display(masked), interpolation="nearest")
    axes[2].set_title(f"masked, fill: {fill}\ns = cos(h, h̄) = {similarity:.3f}")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig, similarity


def masking_explorer(encoder: torch.nn.Module, images: torch.Tensor) -> widgets.Widget:
    """Draw RELAX masks by hand: image, grid size, keep probability, fill and mask seed.

    Args:
        encoder: maps [B, 3, H, W] in [0, 1] to h [B, r]; images: float [N, 3, H, W] in [0, 1].
    """
    index = widgets.IntSlider(value=0, min=0, max=images.shape[0] - 1, description="image", continuous_update=False)
    grid = widgets.IntSlider(value=7, min=2, max=16, description="grid", continuous_update=False)
    p_keep = widgets.FloatSlider(value=0.5, min=0.05, max=1.0, step=0.05, description="p_keep",
                                 continuous_update=False)
    fill = widgets.Dropdown(options=list(FILLS), description="fill")
    seed = widgets.IntSlider(value=0, min=0, max=99, description="mask seed", continuous_update=False)
    output = widgets.Output()

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        with output:
            fig, _ = masking_view(encoder, images[index.value], grid.value, p_keep.value, fill.value, seed.value)
            plt.show()
            plt.close(fig)

    for control in (index, grid, p_keep, fill, seed):
        control.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([index, grid, p_keep]), widgets.HBox([fill, seed]), output])


def qscore_view(H: torch.Tensor, correct: torch.Tensor, eps: float,
                percentiles: tuple[float, float] = (50, 95)) -> tuple[plt.Figure, dict[str, float]]:
    """The ε explorer's callback: the activation-frequency curve and Q for correct vs wrong samples.

    Args:
        H: representations [N, r]; correct: bool [N], whether a classifier got each sample right.
    Returns:
        (fig, summary) with |D|, the share of empty L_i ∩ D and the AUROC of Q predicting ``correct``.
    """
    result = qscore(H, eps=eps, percentiles=percentiles)
    correct = correct.bool().cpu()
    measured = ~result.empty
    summary = {"eps": eps, "|D|": int(result.discriminative.sum()), "empty share": result.empty_share,
               "AUROC (all)": auroc(correct, result.q) if 0 < correct.sum() < len(correct) else float("nan")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    frequency_plot(result, left)
    left.set_title(f"ε = {eps:g}: |D| = {summary['|D|']}, L_i ∩ D empty for {summary['empty share']:.0%}")
    for label, chosen, color in [("correct", correct & measured, "tab:blue"), ("wrong", ~correct & measured, "tab:red")]:
        if chosen.any():
            right.hist(result.q[chosen].numpy(), bins=30, alpha=0.5, density=True, color=color, label=label)
    right.set_xlabel("Q-Score (samples with a non-empty L_i ∩ D)")
    right.set_ylabel("density")
    right.set_title(f"AUROC of Q for 'correct': {summary['AUROC (all)']:.3f}")
    right.legend()
    fig.tight_layout()
    return fig, summary


def qscore_explorer(H: torch.Tensor, correct: torch.Tensor) -> widgets.Widget:
    """An ε slider: how the highly activating sets, D, the empty share and the AUROC move with ε."""
    eps = widgets.FloatSlider(value=2.0, min=0.5, max=5.0, step=0.25, description="ε", continuous_update=False)
    output = widgets.Output()

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        with output:
            fig, _ = qscore_view(H, correct, eps.value)
            plt.show()
            plt.close(fig)

    eps.observe(refresh, names="value")
    refresh()
    return widgets.VBox([eps, output])


def top_activating(H: torch.Tensor, feature: int, count: int = 8) -> torch.Tensor:
    """Indices of the ``count`` samples with the largest L2-normalised value of ``feature``: LongTensor [count]."""
    if not 0 <= feature < H.shape[1]:
        raise ValueError(f"feature {feature} is out of range for r = {H.shape[1]}")
    return torch.nn.functional.normalize(H.float(), dim=1)[:, feature].topk(min(count, H.shape[0])).indices


def feature_browser(H: torch.Tensor, images: torch.Tensor, captions: Sequence[str] | None = None,
                    count: int = 8) -> widgets.Widget:
    """Pick a feature j; shows the images that activate it most (normalised h_j in the titles).

    Args:
        H: representations [N, r]; images: [N, 3, S, S] (uint8 or float in [0, 1]); captions: N strings.
    """
    feature = widgets.IntSlider(value=0, min=0, max=H.shape[1] - 1, description="feature j", continuous_update=False)
    output = widgets.Output()
    normalised = torch.nn.functional.normalize(H.float(), dim=1)

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        with output:
            top = top_activating(H, feature.value, count)
            titles = [f"{normalised[i, feature.value]:.2f}" + (f": {captions[i]}" if captions else "") for i in top]
            fig, _ = image_grid(images[top], titles=titles, ncols=count, panel_size=1.6)
            fig.suptitle(f"top {count} images of feature {feature.value}", y=1.02)
            plt.show()
            plt.close(fig)

    feature.observe(refresh, names="value")
    refresh()
    return widgets.VBox([feature, output])


def falcon_view(explanation, images: torch.Tensor, count: int = 8) -> plt.Figure:
    """One FALCON explanation: the top highly activating images, the lowly activating counterfactuals, and
    the Word Scores with the words the contrastive step discarded.

    Args:
        explanation: ``falcon.FeatureExplanation``; images: the probe images [N, 3, S, S].
    """
    fig = plt.figure(figsize=(1.1 * count + 4.2, 2.7))
    grid = fig.add_gridspec(2, count + 4)
    for row, (indices, label) in enumerate([(explanation.high, "high"), (explanation.low, "low")]):
        for column in range(count):
            ax = fig.add_subplot(grid[row, column])
            ax.set_xticks([]), ax.set_yticks([])
            if column < len(indices):
                ax.imshow(to_display(images[indices[column]]))
            if column == 0:
                ax.set_ylabel(f"{label}\n({len(indices)})", fontsize=8)
    word_score_plot(explanation.scores, explanation.discarded, top=8, ax=fig.add_subplot(grid[:, count + 1:]))
    fig.suptitle(f"feature {explanation.feature}: {', '.join(explanation.concepts[:3]) or '(no concept)'}", fontsize=10)
    return fig


def falcon_browser(explanations: Sequence, images: torch.Tensor, count: int = 8) -> widgets.Widget:
    """Pick an explained feature (or group); shows ``falcon_view`` of it."""
    if not explanations:
        raise ValueError("no explanations to browse; explain some features first")
    options = [(f"{e.feature}: {', '.join(e.concepts[:3])}", i) for i, e in enumerate(explanations)]
    choice = widgets.Dropdown(options=options, value=0, description="feature", layout=widgets.Layout(width="420px"))
    output = widgets.Output()

    def refresh(_change=None) -> None:
        output.clear_output(wait=True)
        with output:
            fig = falcon_view(explanations[choice.value], images, count)
            plt.show()
            plt.close(fig)

    choice.observe(refresh, names="value")
    refresh()
    return widgets.VBox([choice, output])


PairExplainer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def pair_view(x1: torch.Tensor, x2: torch.Tensor, explain: PairExplainer, method: str = "",
              similarity: float | None = None) -> plt.Figure:
    """One pair [3, H, W] x 2 and its two maps from ``explain(x1[None], x2[None])`` (maps [1, H, W] each):
    the images, then each map over its image."""
    map1, map2 = explain(x1[None], x2[None])
    maps = torch.cat([map1.detach().cpu().float(), map2.detach().cpu().float()])
    images = torch.stack([x1, x2]).cpu()
    fig, axes = saliency_grid(images, maps, titles=["x1", "x2"], ncols=2, panel_size=2.2,
                              colorbar_label="importance (each map scaled to its max)")
    title = method + (f"   s(x1, x2) = {similarity:.3f}" if similarity is not None else "")
    fig.suptitle(title, fontsize=10)
    return fig


def pair_explorer(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], methods: Mapping[str, PairExplainer],
                  similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> widgets.Widget:
    """Pick a kind of pair, a pair and a method; shows ``pair_view``.

    Args:
        pairs: name -> (x1 [N, 3, H, W], x2 [N, 3, H, W]), e.g. "two views", "same class", "different class".
        methods: name -> explain(x1 [B, 3, H, W], x2) -> (maps of x1 [B, H, W], maps of x2 [B, H, W]).
        similarity: optional s(x1, x2) -> [B], shown in the title.
    """
    if not pairs or not methods:
        raise ValueError("pair_explorer needs at least one kind of pair and one method")
    if any(len(x1) == 0 or len(x1) != len(x2) for x1, x2 in pairs.values()):
        raise ValueError("every kind of pair needs at least one pair and as many x2 as x1 images")
    kind = widgets.Dropdown(options=list(pairs), description="pairs")
    index = widgets.IntSlider(value=0, min=0, max=len(next(iter(pairs.values()))[0]) - 1, description="pair",
                              continuous_update=False)
    method = widgets.Dropdown(options=list(methods), description="method")
    output = widgets.Output()

    def refresh(_change=None) -> None:
        x1, x2 = pairs[kind.value]
        a, b = x1[index.value], x2[index.value]
        value = None if similarity is None else float(similarity(a[None], b[None])[0])
        output.clear_output(wait=True)
        with output:
            fig = pair_view(a, b, methods[method.value], method.value, value)
            plt.show()
            plt.close(fig)

    def new_kind(_change=None) -> None:
        size = len(pairs[kind.value][0])
        if index.value >= size:
            index.value = size - 1  # observed: redraws
        index.max = size - 1
        refresh()

    kind.observe(new_kind, names="value")
    for control in (index, method):
        control.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([kind, index, method]), output])
