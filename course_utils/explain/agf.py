"""AGF (Gur, Ali & Wolf, AAAI 2021): attribution-guided factorisation, compact, for the course's ResNets
(BasicBlock: depth 10, 18, 34; Bottleneck: depth 50, e.g. ``resnet(50, 64, small_input=False)`` at 224 px).

Two streams run backwards from a scalar target y per image (SCIENCE.md section 6):

* the **gradient stream**: ordinary back-propagation of y (one ``torch.autograd.grad`` call);
* the **attribution stream** Φ, started at the representation h (Eq. 8 spirit) with
  ``Φ^(1) = h ⊙ ∂y/∂h`` and propagated with |x||w| z-rules that keep the total (Eq. 2).  At one
  convolution of every residual block, the first 3x3 of its main branch (conv1 of a BasicBlock, conv2
  of a Bottleneck: the one that strides in a downsampling block), the gradient stream guides a residual
  that is added to it:

      C = G(|x|, |W|, Φ)          = |x| ⊙ convT(Φ / conv(|x|, |W|), |W|)        absolute influence (Eq. 9)
      A = G(1, |W|, Φ)                                                          input-agnostic influence (Eq. 10)
      F_x = F̄(x, C)⁺,  F_∇x = F̄(∇x, C)⁺                                        guided factorisation (Eq. 11)
      M = N_max( (mean_c x ⊙ ∇x)⁺ )                                             input-gradient interaction (Eq. 12)
      r = A + F_∇x + (F_x + M) · sigmoid(C)                                     residual (Eq. 13)
      Φ_in = Δ_shift(C, r) = C + r − Σr / #(C ≠ 0) · 1[C ≠ 0]                   Eq. 4 / Eq. 14

  F̄(Y, φ) splits the pixels by the sign of φ = mean_c C (foreground φ > 0, background φ < 0), takes
  the mean of H = sigmoid(10 · N_max(Y)) over each part as two per-channel representatives R [C, 2],
  solves the 2-component non-negative least squares ``W = relu((RᵀR + I)⁻¹ RᵀH)`` and returns
  ``W_fg − W_bg`` [H, W] (``factorize``).  The Δ-shift restores the total, so Σ Φ is the same at every
  layer.  The heatmap is Φ at the input of the stem convolution (normalised image space), divided by
  its maximum and summed over the colour channels: signed, positive = supports the target.

Other layers: BatchNorm passes Φ unchanged, ReLU keeps it where its input is > 0, the residual
``out = a + b`` splits it in proportion to |a| and |b| (``add_rule="absolute"``, below), the skip fork
sums the two branches, global average pooling and max-pooling use the z-rule, the block's other
convolutions (conv2 of a BasicBlock; the 1x1 conv1 and conv3 of a Bottleneck) and the 1x1 shortcut
convolution use the flat C rule, and the stem convolution the z^B rule with the image's min and max as
bounds.  Both block types run through one code path: a block is a chain of conv-BN stages with a ReLU
between two stages (``_MAIN_BRANCH``), a shortcut and the add.

Targets: any ``target(h) -> [B]``; ``class_target(head, c)`` applies the Eq. 8 transform to a linear
probe's logits (y_t is compared with the classes whose logits are close to it, so the map is class
specific); ``ssl_target(bank)`` is the course's label-free target (below).

Where the course follows the authors' code (github.com/shirgur/AGFVisualization) rather than the
paper's text:

1. only one convolution per block is guided, conv1 of a BasicBlock and conv2 of a Bottleneck; the
   block's other convolutions and the shortcut 1x1 conv use the flat C rule (Alg. 1 guides every
   convolution); the stem uses z^B, BatchNorm the identity;
2. the step function is sigmoid(10 ·) and the least squares has a ridge 1 · I (paper: sigmoid(·), none);
   background is φ < 0 strictly (paper: φ <= 0); F_x and F_∇x are not re-normalised after the relu.

Where the course departs from the code:

3. the residual ``Add``: the code splits Φ in proportion to the *signed* summands, a · Φ / (a + b)
   (``add_rule="signed"``).  After a guided layer Φ is O(1) on every active unit, because F_x, F_∇x and
   M are [H, W] maps broadcast over the channels; where a + b is tiny (1e-7 in the trained encoder)
   and a and b are large with opposite signs, the signed split turns that into ±1e5 relevances that
   cancel in total but leave dipole hot spots in the final map.  The paper specifies no Add rule; its
   attribution rule, Eq. 9 (G with |x| and |θ|), applied to the Add (a linear layer with weights
   1, 1) is the absolute split |a| · Φ / (|a| + |b|), the course's default.  Both keep Σ Φ.  On
   ShapesWorld (simclr-shapes-r10, 200 test images, ``ssl_target``) the pointing game is 0.79 with the
   absolute split and 0.20 with the signed one (random map 0.085, centre prior 0.26).
   ``add_rule="signed"`` is the code's Add rule, not a replica of the code: the tests check every rule
   of this module against explicit loops and the totals by conservation, but no test compares whole
   maps with the authors' implementation (item 4 lists where the gradient stream differs from it).

Where the course simplifies:

4. the gradient stream comes from one autograd call on the actual forward pass; ∇x at a guided conv is
   the gradient through that conv only (at a BasicBlock's conv1 the skip branch excluded, as in the
   code) but without the code's mask 1[Φ_out ≠ 0];
5. the representation h (after GAP) is the output layer: there is no fc layer and no linear-layer
   residual (supplementary Eq. 1); Eq. 8's softmax-gaussian transform is applied only by
   ``class_target`` — a target that is not a class score seeds ``Φ^(1) = h ⊙ ∂y/∂h`` directly, or
   ``target.relevance_seed(h, ∂y/∂h)`` where the target defines one (``ssl_target(evidence="unique")``);
6. SSL (Alg. 2): the paper's SSL models have a classification head of the SSL task (clusters,
   pseudo-labels, rotations); it subtracts the nearest neighbour's latent, S_I = L_I − L_N, "to
   emphasize the unique elements of L_I", and explains the head's top class of S_I, propagating
   through the image's own network (input tuple [φ_τ(S_I), φ_F(I)]).  SimCLR has no such head, so
   ``ssl_target`` keeps Alg. 2's ingredients — the nearest neighbours in the representation space of a
   reference bank (the image itself excluded) and the subtraction of a shared component — and offers
   two questions (``evidence=``):

   ``evidence="unique"`` (Alg. 2): what sets the image apart from its nearest neighbours.  With
   S_I = h − h̄_N (h̄_N = mean of the k nearest bank entries; k = 1 is the paper's single neighbour)
   and the "class" direction u = S_I / ||S_I|| (SimCLR has no head whose top class could pick one),

       y(h) = ⟨h − h̄_N, u⟩ = ||S_I||,      Φ^(1) = S_I ⊙ u = S_I² / ||S_I||  (≥ 0, Σ Φ^(1) = y),

   the relevance I's own latent gets minus the relevance its neighbours' latent would get along u;
   it equals the paper's |x||w| rule (Eq. 9) through a linear head u applied to S_I.  It is then
   propagated through the image's own activations (features the neighbours have and the image lacks
   have no activation to land on: their share of Σ Φ is dropped at the pooling layer).

   ``evidence="shared"`` (default, the complementary question): what the image shares with its
   neighbours beyond what every image shares — a linear score like a class logit whose weight vector
   is the neighbours' centred mean, seeded Φ^(1) = h ⊙ ∂y/∂h:

       y(h) = ⟨h − μ, u⟩,  u = (h̄_N − μ) / ||h̄_N − μ||,  h̄_N = mean of the k nearest bank entries (L2),
       μ = mean of the bank.

   The component subtracted is the one *every* image shares (μ), not the single neighbour's latent:
   SimCLR's h are non-negative (ReLU + GAP) with a large common mean, so an uncentred similarity
   mostly asks for "more of every feature".  A projection rather than a cosine: the cosine is
   invariant to the scale of h − μ, so (h − μ) · ∂y/∂h = 0 and h ⊙ ∂y/∂h would not decompose the
   score (with the projection, Σ Φ^(1) = ⟨h, u⟩ = y + ⟨μ, u⟩).  k = 5 neighbours instead of 1
   (less noise).  Measured on ShapesWorld (pointing game, 200 test images): k = 1, 5, 20 give 0.82,
   0.79, 0.80; the centred cosine 0.66; the uncentred projection ⟨h, unit(h̄_N)⟩ 0.89 and ‖h‖² 0.90 —
   the object is the only salient structure there, so "more of everything" finds it too (the
   mean cosine of h with μ is 0.92), but it does not say what the image shares with its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

from course_utils.inputs import check_features, check_images
from course_utils.models import BasicBlock, Bottleneck, ResNet, SimCLRModel
from course_utils.runtime import eval_mode

Target = Callable[[torch.Tensor], torch.Tensor]
STEP_SCALE = 10.0  # the Heaviside surrogate sigmoid(10 · Y) of the reference code
RIDGE = 1.0  # ridge added to RᵀR in the factorisation (reference code)
_EPS = 1e-9


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with |b| clamped to >= 1e-9 and 0 where b == 0 (broadcasting)."""
    den = torch.where(b >= 0, b.clamp(min=_EPS), b.clamp(max=-_EPS))
    return a / den * (b != 0)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like``."""
    return values.view(-1, *[1] * (like.ndim - 1))


def n_max(t: torch.Tensor) -> torch.Tensor:
    """N_max: ``t`` [B, ...] divided by its maximum over all but the batch dimension."""
    return safe_div(t, _per_sample(t.flatten(1).amax(1), t))


def _conv(t: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(t, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_back(s: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d, shape: torch.Size) -> torch.Tensor:
    """The transposed convolution of ``s`` (= gradient of ``_conv`` w.r.t. an input of ``shape``)."""
    return conv2d_input(shape, weight, s, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_flat(phi: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Eq. 9, C = G(|x|, |W|, Φ): Φ [B, K, h, w] at the output of ``conv`` -> [B, C, H, W] at its input x.

    ``Σ C = Σ Φ`` over the outputs with a non-zero denominator conv(|x|, |W|)."""
    x_abs, w_abs = x.abs(), conv.weight.abs()
    return x_abs * _conv_back(safe_div(phi, _conv(x_abs, w_abs, conv)), w_abs, conv, x.shape)


def factorize(y: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Guided factorisation F̄(Y, φ): Y [B, C, H, W] and partition φ [B, 1, H, W] -> F [B, 1, H, W].

    Foreground is φ > 0, background φ < 0.  Positive F: the pixel's channel profile of
    sigmoid(10 · N_max(Y)) looks like the foreground's mean profile; negative: like the background's.
    """
    batch, _, height, width = y.shape
    steps = torch.sigmoid(STEP_SCALE * n_max(y)).flatten(2)  # H: [B, C, HW]
    parts = torch.stack([phi.flatten(1) < 0, phi.flatten(1) > 0], 1).to(y.dtype)  # [B, 2, HW] (bg, fg)
    reps = safe_div(steps @ parts.transpose(1, 2), parts.sum(2)[:, None, :])  # R: [B, C, 2]
    gram = reps.transpose(1, 2) @ reps + RIDGE * torch.eye(2, dtype=y.dtype, device=y.device)  # [B, 2, 2]
    # closed-form inverse of the symmetric 2x2 (det >= RIDGE² > 0); batched LAPACK solves are slow on CPU
    g00, g01, g11 = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    inverse = torch.stack([g11, -g01, -g01, g00], 1).view(-1, 2, 2) / (g00 * g11 - g01**2)[:, None, None]
    weights = (inverse @ (reps.transpose(1, 2) @ steps)).clamp(min=0)  # W: [B, 2, HW]
    return (weights[:, 1] - weights[:, 0]).view(batch, 1, height, width)


def delta_shift(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Δ_shift(G, r) (Eq. 4): add r and subtract its mean over the non-zero units of G; Σ G is kept."""
    nonzero = (g != 0).to(g.dtype)
    shift = r.flatten(1).sum(1) / nonzero.flatten(1).sum(1).clamp(min=1)
    return g + r - _per_sample(shift, g) * nonzero


def conv_guided(phi: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Full AGF step (Eqs. 9-14) at ``conv``: Φ [B, K, h, w] -> Φ_in [B, C, H, W], with x and
    ∇x = ∂y/∂x [B, C, H, W] at its input."""
    c = conv_flat(phi, x, conv)
    a = conv_flat(phi, torch.ones_like(x), conv)
    partition = c.mean(1, keepdim=True)
    f_x, f_grad = factorize(x, partition).clamp(min=0), factorize(grad, partition).clamp(min=0)
    m = n_max((x * grad).mean(1, keepdim=True).clamp(min=0))
    r = (a + f_grad + (f_x + m) * torch.sigmoid(c)) * (c != 0)
    return delta_shift(c, r)


ADD_RULES = ("absolute", "signed")


def add_split(phi: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              rule: str = "absolute") -> tuple[torch.Tensor, torch.Tensor]:
    """Φ at ``a + b`` -> (Φ_a, Φ_b) in proportion to |a| and |b| (Eq. 9 with weights 1), or to the
    signed a and b (``rule="signed"``, the authors' code).  Φ_a + Φ_b = Φ where the denominator is not 0."""
    if rule == "signed":
        share = safe_div(phi, a + b)
        return a * share, b * share
    share = safe_div(phi, a.abs() + b.abs())
    return a.abs() * share, b.abs() * share


def gap_split(phi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """z-rule of global average pooling: Φ [B, C] -> [B, C, H, W], ``x · Φ_c / Σ_hw x_c``."""
    return x * safe_div(phi, x.sum((2, 3)))[:, :, None, None]


def pool_split(phi: torch.Tensor, x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """z-rule of a pooling layer (max-pooling: Φ goes to the maxima): [B, C, h, w] -> [B, C, H, W]."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        z = pool(leaf)
        (grad,) = torch.autograd.grad(z, leaf, safe_div(phi, z))
    return x * grad


def stem_zb(phi: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """z^B rule at the first convolution, with each image's min and max as the input bounds:
    Φ [B, K, h, w] -> [B, 3, H, W] at the normalised image x."""
    low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    w_pos, w_neg = conv.weight.clamp(min=0), conv.weight.clamp(max=0)
    share = safe_div(phi, _conv(x - low, w_pos, conv) + _conv(x - high, w_neg, conv))
    return (x - low) * _conv_back(share, w_pos, conv, x.shape) + (x - high) * _conv_back(share, w_neg, conv, x.shape)


# Each residual block type: its main branch as (conv, BatchNorm) attribute names in forward order, a ReLU
# between two stages, and the stage whose convolution is guided (the first 3x3, as in the authors' code)
_MAIN_BRANCH: dict[type, tuple[tuple[tuple[str, str], ...], int]] = {
    BasicBlock: ((("conv1", "bn1"), ("conv2", "bn2")), 0),
    Bottleneck: ((("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), 1),
}


@dataclass
class _BlockTrace:
    """What the backward pass of one residual block needs: the inputs of its main-branch convolutions
    (``inputs[0]`` is the block input, then the ReLU outputs), the guided convolution's input as it entered
    the graph (its gradient is the one through that conv only) and the two summands of the residual add."""

    block: nn.Module
    inputs: list[torch.Tensor]
    guided_input: torch.Tensor
    main: torch.Tensor
    skip: torch.Tensor


def _trace_block(block: nn.Module, t: torch.Tensor) -> tuple[_BlockTrace, torch.Tensor]:
    """Run ``block`` on t (in the graph): (its trace, its output) — the block's own forward, step by step."""
    stages, guided = _MAIN_BRANCH[type(block)]
    inputs, u = [], t
    for k, (conv, bn) in enumerate(stages):
        if k == guided:
            u = guided_input = u.clone()  # at conv1, the skip fork: ∂y/∂u is the gradient through this conv only
        inputs.append(u.detach())
        u = getattr(block, bn)(getattr(block, conv)(u))
        if k < len(stages) - 1:
            u = torch.relu(u)
    skip = block.shortcut(t)
    return _BlockTrace(block, inputs, guided_input, u.detach(), skip.detach()), torch.relu(u + skip)


def _block_relevance(trace: _BlockTrace, phi: torch.Tensor, grad: torch.Tensor, guided: bool,
                     add_rule: str) -> torch.Tensor:
    """Φ at a block's output -> Φ at its input: the last ReLU, the add split, the main branch conv by conv
    (BatchNorm the identity, the guided conv with ∇x = ``grad``, the others flat, each inner ReLU a mask), the
    shortcut (its 1x1 conv flat, its BatchNorm the identity) and the skip fork's sum."""
    block = trace.block
    stages, guided_stage = _MAIN_BRANCH[type(block)]
    phi = phi * (trace.main + trace.skip > 0)  # the last ReLU
    phi_main, phi_skip = add_split(phi, trace.main, trace.skip, add_rule)
    for k in reversed(range(len(stages))):
        conv, inp = getattr(block, stages[k][0]), trace.inputs[k]
        if guided and k == guided_stage:
            phi_main = conv_guided(phi_main, inp, grad, conv)
        else:
            phi_main = conv_flat(phi_main, inp, conv)
        if k > 0:
            phi_main = phi_main * (inp > 0)  # the ReLU that made this input
    if not isinstance(block.shortcut, nn.Identity):  # Sequential(conv1x1, bn)
        phi_skip = conv_flat(phi_skip, trace.inputs[0], block.shortcut[0])
    return phi_main + phi_skip  # the skip fork


def _check_encoder(encoder: nn.Module) -> ResNet:
    if isinstance(encoder, SimCLRModel):
        encoder = encoder.encoder
    if not isinstance(encoder, ResNet):
        raise ValueError(f"AGF needs a course ResNet encoder (course_utils.models.resnet), "
                         f"got {type(encoder).__name__}")
    layers = (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
    unknown = {type(block) for layer in layers for block in layer} - set(_MAIN_BRANCH)
    if unknown:
        raise ValueError(f"AGF here supports ResNets of BasicBlock (depth 10, 18, 34) or Bottleneck (depth 50) "
                         f"blocks; this encoder has {', '.join(sorted(t.__name__ for t in unknown))} blocks")
    stem = list(encoder.stem)
    if not stem or not isinstance(stem[0], nn.Conv2d) or any(
            not isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)) for m in stem[1:]):
        raise ValueError(f"AGF expects a stem of Conv2d followed by BatchNorm2d, ReLU and MaxPool2d, got {stem}")
    return encoder


def agf_relevance(encoder: nn.Module, x: torch.Tensor, target: Target, guided: bool = True,
                  add_rule: str = "absolute") -> tuple[torch.Tensor, torch.Tensor]:
    """The AGF attribution stream, unnormalised.

    Args:
        encoder: a course ``ResNet`` of BasicBlock or Bottleneck blocks (or a ``SimCLRModel``, whose encoder
            is used); run in eval mode on its own device (its mode is restored).
        x: images float [B, 3, H, W] in [0, 1] (``inputs.check_images``: a wrong shape, uint8, 0–255 values,
            NaN/inf or an empty batch raise ``ValueError``; float64 is converted to the encoder's dtype).
        target: ``target(h) -> [B]``, one score per image of the representation h [B, r] that
            depends on that image only (``class_target``, ``ssl_target`` or e.g. ``lambda h: h[:, 3]``).
            A target with a method ``relevance_seed(h, grad) -> [B, r]`` chooses Φ^(1) itself (default
            ``h ⊙ grad``, with grad = ∂y/∂h).
        guided: False uses the flat C rule at every convolution (the paper's "C only" ablation,
            |x||w|-LRP seeded by the target).
        add_rule: how the residual add splits Φ: "absolute" (|a| : |b|, Eq. 9) or "signed" (a : b,
            the authors' code; see the module docstring).
    Returns:
        (Φ at the normalised image [B, 3, H, W], Φ^(1) [B, r]) on the encoder's device, in
        its dtype.  The totals per image agree up to what the zero denominators drop: an output unit
        whose receptive field is all zero (conv(|x|, |W|) = 0) passes no relevance back, although the
        BatchNorm bias after it made it non-zero and the residual add gave it relevance (at a Bottleneck's
        1x1 convolutions the receptive field is one pixel: every channel of that pixel dead).
    """
    encoder = _check_encoder(encoder)
    x = check_images(x, "x", like=encoder.stem[0].weight)
    if add_rule not in ADD_RULES:
        raise ValueError(f"add_rule must be one of {ADD_RULES}, got {add_rule!r}")
    with eval_mode(encoder):
        with torch.enable_grad():
            image = encoder.normalize(x)
            t = image.detach().requires_grad_()  # the graph exists even for a frozen encoder
            stem_inputs = []
            for module in encoder.stem:
                stem_inputs.append(t.detach())
                t = module(t)
            traces = []
            for block in (b for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
                          for b in layer):
                trace, t = _trace_block(block, t)
                traces.append(trace)
            feature_map = t.detach()
            h = encoder.pool(t)
            scores = target(h)
            if not isinstance(scores, torch.Tensor) or scores.shape != (x.shape[0],):
                shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(f"the target must give one score per image, shape [{x.shape[0]}], got {shape}")
            if not scores.requires_grad:
                raise ValueError("the target does not depend on the representation h")
            grads = torch.autograd.grad(scores.sum(), [h, *(tr.guided_input for tr in traces)], allow_unused=True)
        if grads[0] is None:
            raise ValueError("the target does not depend on the representation h")
        with torch.no_grad():
            seed = getattr(target, "relevance_seed", None)
            phi_h = seed(h.detach(), grads[0]) if callable(seed) else h.detach() * grads[0]  # Φ^(1) [B, r]
            if phi_h.shape != h.shape:
                raise ValueError(f"relevance_seed must return [B, r] = {tuple(h.shape)}, got {tuple(phi_h.shape)}")
            phi = gap_split(phi_h, feature_map)
            for trace, grad in zip(reversed(traces), reversed(grads[1:])):
                phi = _block_relevance(trace, phi, grad, guided, add_rule)
            for module, inp in zip(reversed(encoder.stem), reversed(stem_inputs)):
                if isinstance(module, nn.ReLU):
                    phi = phi * (inp > 0)
                elif isinstance(module, nn.MaxPool2d):
                    phi = pool_split(phi, inp, module)
                elif isinstance(module, nn.Conv2d):
                    phi = stem_zb(phi, inp, module)
    return phi, phi_h


def agf(encoder: nn.Module, x: torch.Tensor, target: Target, guided: bool = True,
        add_rule: str = "absolute") -> torch.Tensor:
    """AGF heatmaps of ``target`` for a batch of images (arguments as ``agf_relevance``).

    Returns:
        float32 [B, H, W] on x's device: Φ at the normalised image divided by its maximum over
        (3, H, W) and summed over the channels; positive supports the target, negative opposes it.
    """
    phi, _ = agf_relevance(encoder, x, target, guided, add_rule)
    top = phi.flatten(1).amax(1)
    scale = torch.where(top > 0, top, phi.flatten(1).abs().amax(1))  # all <= 0: keep the sign
    return safe_div(phi, _per_sample(scale, phi)).sum(1).to(x.device, torch.float32)


class class_target:  # noqa: N801 - lower-case like the Grad-CAM targets
    """Eq. 8 class score of a head on h: ``ŷ_t = softmax(y_t · exp(−½((y − y_t) / σ)²))_t`` with
    logits y = head(h) and σ = max_i |y_i − y_t| (per image).

    Args:
        head: maps h [B, r] to logits [B, K], e.g. ``probe.classifier`` of ``simclr.linear_probe``.
        classes: one class index for the whole batch, or a LongTensor [B] (e.g. the predictions).
    """

    def __init__(self, head: nn.Module, classes: int | torch.Tensor) -> None:
        self.head, self.classes = head, classes

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if logits.ndim != 2:
            raise ValueError(f"the head must give logits [B, K], got shape {tuple(logits.shape)}")
        index = torch.as_tensor(self.classes, device=logits.device).long().flatten()
        if index.numel() == 1:
            index = index.expand(logits.shape[0])
        if index.shape != (logits.shape[0],):
            raise ValueError(f"classes must be one index or one per image ({logits.shape[0]}), got {index.numel()}")
        if not 0 <= int(index.min()) <= int(index.max()) < logits.shape[1]:
            raise ValueError(f"class indices must lie in [0, {logits.shape[1]}), got {index.tolist()}")
        index = index.view(-1, 1)
        y_t = logits.gather(1, index)
        sigma = (logits - y_t).abs().amax(1, keepdim=True).clamp(min=_EPS)
        return torch.softmax(y_t * torch.exp(-0.5 * ((logits - y_t) / sigma) ** 2), 1).gather(1, index)[:, 0]


SSL_EVIDENCE = ("shared", "unique")


class ssl_target:  # noqa: N801
    """Label-free target from a bank's nearest neighbours (the course's reading of Alg. 2).

    ``evidence="shared"`` (default): ``y(h) = ⟨h − μ, u⟩`` with ``u = (h̄_N − μ) / ||h̄_N − μ||`` — what the
    image shares with its neighbours beyond the bank mean μ; Φ^(1) = h ⊙ ∂y/∂h.

    ``evidence="unique"`` (Alg. 2, S_I = L_I − L_N): ``y(h) = ⟨h − h̄_N, u⟩`` with ``u = (h − h̄_N) / ||h − h̄_N||``
    (= ||h − h̄_N||) — what sets the image apart from its neighbours; Φ^(1) = (h − h̄_N) ⊙ u, the relevance of
    the image's latent minus the relevance of its neighbours' latent (``relevance_seed``).

    h̄_N is the mean of the image's k nearest neighbours (L2) in a reference bank of representations
    and μ the bank's mean; h̄_N, μ and u are constants for the gradient.  Bank entries within
    ``self_tolerance · ||h||`` of h count as the image itself and are skipped.

    Args:
        bank: representations [M, r] of reference images, e.g. ``extract_features(encoder, train_set)[0]``.
        k: neighbours averaged (the paper's Alg. 2 uses the single nearest, k = 1).
        self_tolerance: relative distance below which a bank entry is the image itself (a bank computed
            under bf16 autocast is not bit-identical to the fp32 forward pass).
        evidence: "shared" or "unique" (above; module docstring, item 6).
    """

    def __init__(self, bank: torch.Tensor, k: int = 5, self_tolerance: float = 1e-2, evidence: str = "shared") -> None:
        check_features(bank, "bank (representations [M, r])")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < bank.shape[0]:
            raise ValueError(f"k must be an integer in [1, {bank.shape[0] - 1}] for a bank of {bank.shape[0]}, got {k}")
        if self_tolerance < 0:
            raise ValueError(f"self_tolerance must be >= 0, got {self_tolerance}")
        if evidence not in SSL_EVIDENCE:
            raise ValueError(f"evidence must be one of {SSL_EVIDENCE}, got {evidence!r}")
        self.bank, self.k, self.self_tolerance, self.evidence = bank.detach().float(), k, self_tolerance, evidence
        self.mean = self.bank.mean(0)

    def neighbours(self, h: torch.Tensor) -> torch.Tensor:
        """Indices [B, k] into the bank of the k nearest neighbours of each h [B, r], nearest first."""
        if h.ndim != 2 or h.shape[1] != self.bank.shape[1]:
            raise ValueError(f"h must be [B, {self.bank.shape[1]}] like the bank, got {tuple(h.shape)}")
        h = h.detach().float()
        distances = torch.cdist(h, self.bank.to(h.device))
        itself = distances <= self.self_tolerance * h.norm(dim=1, keepdim=True)
        nearest = distances.masked_fill(itself, float("inf")).topk(self.k, dim=1, largest=False)
        if torch.isinf(nearest.values).any():
            raise ValueError(f"the bank has fewer than k={self.k} entries other than the image itself")
        return nearest.indices

    def reference(self, h: torch.Tensor) -> torch.Tensor:
        """What is subtracted from h [B, r]: μ ("shared") or h̄_N, the neighbours' mean ("unique"); in h's dtype."""
        if self.evidence == "unique":
            return self.bank.to(h.device, h.dtype)[self.neighbours(h)].mean(1)
        return self.mean.to(h.device, h.dtype).expand_as(h)

    def direction(self, h: torch.Tensor) -> torch.Tensor:
        """u [B, r] for representations h [B, r], in h's dtype: unit(h̄_N − μ) ("shared") or unit(h − h̄_N)
        ("unique")."""
        if self.evidence == "unique":
            return F.normalize(h.detach() - self.reference(h), dim=1)
        bank, mean = self.bank.to(h.device, h.dtype), self.mean.to(h.device, h.dtype)
        return F.normalize(bank[self.neighbours(h)].mean(1) - mean, dim=1)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return ((h - self.reference(h)) * self.direction(h)).sum(1)

    def relevance_seed(self, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Φ^(1) [B, r] from h and grad = ∂y/∂h (= u): h ⊙ u ("shared"), (h − h̄_N) ⊙ u ("unique")."""
        if self.evidence == "unique":
            return (h - self.reference(h)) * grad
        return h * grad
