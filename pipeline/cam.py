"""Concept activation maps: where in an image each concept centroid is (TransFGU pseudo labels).

For concept c the loss is ``1 - cos(image embedding, centroid_c)``.

* ViT backbones (``cam_method = "attention_gradient"``), as in the paper: g = dL/dA for
  the last block's softmax attention A, mean over heads, [CLS] row, patch columns.
  ``CAM_c = attn / max(attn) + relu(-g) * top_mass_mask(relu(-g))``, then 0 wherever g > 0,
  where ``attn`` is the [CLS]->patch attention (mean over heads).
* CNN backbones (``cam_method = "gradcam"``): Grad-CAM of the same loss on the dense map F,
  ``relu(sum_ch w_ch F_ch)`` with ``w_ch = spatial mean of -dL/dF_ch``.

A is the attention *after* softmax (the reference retains the grad of the probabilities).

:func:`compute_cams` gets all K concepts from one forward pass (the first L-1 blocks
under ``no_grad``) and one batched vector-Jacobian product; :func:`compute_cams_loop`
runs one full forward and one backward (to the full T x T map) per concept, the
straightforward port of the reference's per-concept loop, kept as the test oracle and
benchmark baseline. Both return the same numbers.

Loss scale: each image's loss is its own (the batch is summed, not averaged), so a CAM
does not depend on which images share its batch. The reference averaged over its batch
(8 images for COCO/VOC, 2 for Cityscapes/LIP), which scales g by 1/B relative to the
attention term; pass ``grad_scale=1/B`` to reproduce that weighting.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.backbones import Backbone
from pipeline.registry import Registry

__all__ = [
    "add_background_channel",
    "attention_gradient_cam",
    "cams_to_labels",
    "compute_cams",
    "compute_cams_loop",
    "concept_loss",
    "CAM_METHODS",
    "normalize_cams",
    "register_cam_method",
    "top_mass_mask",
]

NormScope = Literal["image", "concept"]


class CamFn(Protocol):
    def __call__(self, backbone: Backbone, images: Tensor, centroids: Tensor, mass: float, grad_scale: float,
                 frozen_dtype: torch.dtype | None = None) -> Tensor: ...


# backbone.cam_method -> (batched implementation, one-backward-per-concept implementation)
CAM_METHODS: Registry[tuple[CamFn, CamFn]] = Registry("CAM method", param="backbone.cam_method")


def register_cam_method(name: str, loop: CamFn) -> Callable[[CamFn], CamFn]:
    """Decorator registering the batched CAM for ``backbone.cam_method == name`` with its loop twin."""

    def deco(batched: CamFn) -> CamFn:
        CAM_METHODS.register(name, (batched, loop))
        return batched

    return deco


def _resolve(backbone: Backbone) -> tuple[CamFn, CamFn]:
    return CAM_METHODS.get(getattr(backbone, "cam_method", ""))


def _check_inputs(backbone: Backbone, images: Tensor, centroids: Tensor) -> Tensor:
    if centroids.ndim != 2 or centroids.shape[1] != backbone.embed_dim:
        raise ValueError(f"centroids must be (K, {backbone.embed_dim}), got {tuple(centroids.shape)}")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    return centroids.to(device=images.device, dtype=torch.float32)


def compute_cams(
    backbone: Backbone, images: Tensor, centroids: Tensor, mass: float = 0.8, *, grad_scale: float = 1.0,
    frozen_dtype: torch.dtype | None = None,
) -> Tensor:
    """Images (B, 3, H, W) in [0, 1], centroids (K, D) -> CAMs (B, K, h, w) float32, >= 0.

    One batched gradient for all K concepts. ``mass`` is the share of the negative
    gradient's mass kept by the binarisation (ViT only; Grad-CAM ignores it).
    ``frozen_dtype`` (torch.bfloat16): run the part that needs no gradient (ViT blocks
    1..L-1, the CNN trunk) under autocast to that dtype; the last block, the loss and the
    gradient stay float32 (pseudolabels.frozen_bf16).
    """
    centroids = _check_inputs(backbone, images, centroids)
    batched, _ = _resolve(backbone)
    # Callers may sit in no_grad / inference_mode; the few differentiable ops need autograd.
    with torch.inference_mode(False):
        return batched(backbone, images, centroids, mass, grad_scale, frozen_dtype)


def compute_cams_loop(
    backbone: Backbone, images: Tensor, centroids: Tensor, mass: float = 0.8, *, grad_scale: float = 1.0
) -> Tensor:
    """Same result as :func:`compute_cams` (in float32), one full forward + backward per concept (slow)."""
    centroids = _check_inputs(backbone, images, centroids)
    _, loop = _resolve(backbone)
    with torch.inference_mode(False):
        return loop(backbone, images, centroids, mass, grad_scale)


# --------------------------------------------------------------------------- shared pieces


@contextlib.contextmanager
def _frozen(images: Tensor, dtype: torch.dtype | None) -> Iterator[None]:
    """No gradient, and autocast to ``dtype`` when given: the context of a CAM's frozen part."""
    low = torch.autocast(images.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), low:
        yield


def concept_loss(embedding: Tensor, centroids: Tensor) -> Tensor:
    """embedding (B, D), centroids (K, D) -> 1 - cosine similarity, (B, K)."""
    return 1.0 - F.normalize(embedding, dim=-1) @ F.normalize(centroids, dim=-1).T


def _batched_grad(losses: Tensor, wrt: Tensor, grad_scale: float) -> Tensor:
    """d(sum_b losses[b, k]) / d wrt for every k at once: losses (B, K) -> (K, *wrt.shape).

    One vmapped backward: grad_outputs[k] is the one-hot column selector for concept k.
    """
    B, K = losses.shape
    selector = torch.eye(K, dtype=losses.dtype, device=losses.device).mul_(grad_scale)
    grad_outputs = selector[:, None, :].expand(K, B, K)
    (grads,) = torch.autograd.grad(losses, wrt, grad_outputs=grad_outputs, is_grads_batched=True)
    return grads


def top_mass_mask(values: Tensor, mass: float) -> Tensor:
    """Smallest set of largest entries holding ``mass`` of the total, over the last dim.

    values (..., N) >= 0 -> bool (..., N). Entries are sorted ascending and kept where the
    normalised cumulative sum exceeds ``1 - mass`` (DINO / TransFGU ``binarize_mask``).
    All-zero rows give an all-False mask.
    """
    sorted_vals, order = torch.sort(values, dim=-1, stable=True)
    total = sorted_vals.sum(dim=-1, keepdim=True)
    cum = torch.cumsum(sorted_vals / total.clamp_min(torch.finfo(values.dtype).tiny), dim=-1)
    keep_sorted = cum > (1.0 - mass)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def attention_gradient_cam(attn_cls: Tensor, grad: Tensor, mass: float) -> Tensor:
    """[CLS]->patch attention (B, h, w) and gradients g (B, K, h, w) -> CAMs (B, K, h, w).

    ``attn / max(attn) + relu(-g) * top_mass_mask(relu(-g))``, set to 0 where g > 0.
    """
    B, K, h, w = grad.shape
    attn_vis = attn_cls / attn_cls.flatten(1).amax(dim=1).view(B, 1, 1)
    neg = (-grad).clamp_min(0)
    mask = top_mass_mask(neg.reshape(B, K, h * w), mass).view(B, K, h, w)
    cam = attn_vis[:, None] + neg * mask
    return cam.masked_fill(grad > 0, 0.0)


# --------------------------------------------------------------------------- ViT: attention gradient


def _vit_cams_loop(backbone: Backbone, images: Tensor, centroids: Tensor, mass: float, grad_scale: float,
                   frozen_dtype: torch.dtype | None = None) -> Tensor:
    """Reference-style: per concept, a full forward with the full (B, heads, T, T) attention
    map as a leaf and one backward to it."""
    B, _, H, W = images.shape
    h, w = backbone.grid(H, W)
    cams = []
    for centroid in centroids:
        with torch.enable_grad():
            inp = backbone.last_block_inputs(backbone.forward_tokens_before_last(images))
            attn = backbone.last_block_attention(inp).detach().requires_grad_()
            embedding = backbone.last_block_from_attention(inp, attn)[:, 0]
            loss = concept_loss(embedding, centroid[None]).sum() * grad_scale
            (grad,) = torch.autograd.grad(loss, attn)
        g = grad.mean(1)[:, 0, 1:].reshape(B, 1, h, w)
        attn_cls = attn.detach().mean(1)[:, 0, 1:].reshape(B, h, w)
        cams.append(attention_gradient_cam(attn_cls, g, mass))
    return torch.cat(cams, dim=1).float()


@register_cam_method("attention_gradient", loop=_vit_cams_loop)
def _vit_cams(backbone: Backbone, images: Tensor, centroids: Tensor, mass: float, grad_scale: float,
              frozen_dtype: torch.dtype | None = None) -> Tensor:
    """All concepts at once: blocks 1..L-1 without a graph (under ``frozen_dtype`` autocast when
    given), then only the [CLS] row of the last attention map as the leaf (the [CLS] embedding
    depends on no other row, so the other rows' gradients are exactly zero), and one vmapped
    backward for the K losses, in float32."""
    B, _, H, W = images.shape
    h, w = backbone.grid(H, W)
    with _frozen(images, frozen_dtype):
        tokens = backbone.forward_tokens_before_last(images)
    with torch.no_grad():
        inp = backbone.last_block_inputs(tokens.float())
        attn = backbone.last_block_attention(inp, rows=1)  # (B, heads, 1, T)
    attn.requires_grad_()
    with torch.enable_grad():
        embedding = backbone.last_block_from_attention(inp, attn)[:, 0]
        grads = _batched_grad(concept_loss(embedding, centroids), attn, grad_scale)  # (K, B, heads, 1, T)
    K = centroids.shape[0]
    g = grads.mean(2)[:, :, 0, 1:].reshape(K, B, h, w).transpose(0, 1)
    attn_cls = attn.detach().mean(1)[:, 0, 1:].reshape(B, h, w)
    return attention_gradient_cam(attn_cls, g, mass).float()


# --------------------------------------------------------------------------- CNN: Grad-CAM


def _gradcam_loop(backbone: Backbone, images: Tensor, centroids: Tensor, mass: float, grad_scale: float,
                  frozen_dtype: torch.dtype | None = None) -> Tensor:
    """Per concept: full forward, backward to the dense map F, Grad-CAM."""
    cams = []
    for centroid in centroids:
        with torch.enable_grad():
            dense = backbone.dense_features(images).detach().requires_grad_()
            loss = concept_loss(backbone.embedding_from_dense(dense), centroid[None]).sum() * grad_scale
            (grad,) = torch.autograd.grad(loss, dense)
        weights = (-grad).mean(dim=(2, 3))  # (B, C)
        cams.append(torch.einsum("bc,bchw->bhw", weights, dense.detach()).clamp_min(0)[:, None])
    return torch.cat(cams, dim=1).float()


@register_cam_method("gradcam", loop=_gradcam_loop)
def _gradcam(backbone: Backbone, images: Tensor, centroids: Tensor, mass: float, grad_scale: float,
             frozen_dtype: torch.dtype | None = None) -> Tensor:
    """Grad-CAM for all concepts from one forward.

    The embedding is the spatial mean of F, so dL/dF at every position is dL/de / (h*w)
    and its spatial mean is dL/de / (h*w): differentiating w.r.t. the (B, D) embedding
    gives the Grad-CAM weights without a (K, B, D, h, w) gradient tensor.
    """
    with _frozen(images, frozen_dtype):
        dense = backbone.dense_features(images)  # (B, C, h, w)
    dense = dense.float()
    h, w = dense.shape[-2:]
    embedding = backbone.embedding_from_dense(dense).requires_grad_()
    with torch.enable_grad():
        grads = _batched_grad(concept_loss(embedding, centroids), embedding, grad_scale)  # (K, B, C)
    weights = -grads / (h * w)
    return torch.einsum("kbc,bchw->bkhw", weights, dense).clamp_min(0).float()


# --------------------------------------------------------------------------- post-processing


def normalize_cams(cams: Tensor, scope: NormScope = "image") -> Tensor:
    """Min-max normalise CAMs (B, K, h, w) to [0, 1].

    scope="image": one min/max per image over all concepts and pixels (the reference's
    ``(label - label.min()) / (label.max() - label.min())`` per image); keeps the relative
    strength of concepts. scope="concept": one min/max per image and concept.
    Constant maps become 0.
    """
    if scope not in ("image", "concept"):
        raise ValueError(f"scope must be 'image' or 'concept', got {scope!r}")
    dims = (1, 2, 3) if scope == "image" else (2, 3)
    lo = cams.amin(dim=dims, keepdim=True)
    span = cams.amax(dim=dims, keepdim=True) - lo
    return torch.where(span > 0, (cams - lo) / span.clamp_min(torch.finfo(cams.dtype).tiny), torch.zeros_like(cams))


def add_background_channel(cams: Tensor, threshold: float = 0.1, scope: NormScope = "image") -> Tensor:
    """CAMs (B, K, h, w) -> (B, K + 1, h, w): channels 0..K-1 = normalised CAMs, K = background.

    background = relu(threshold - max_c normalised CAM_c), as the reference does for
    object-centric sets (VOC, LIP). The reference prepends it; here it comes last so
    concept c keeps channel c (the pseudo-label store lists pools then "background").
    """
    normed = normalize_cams(cams, scope)
    background = (threshold - normed.amax(dim=1, keepdim=True)).clamp_min(0)
    return torch.cat([normed, background], dim=1)


def cams_to_labels(cams: Tensor, scope: NormScope = "image") -> Tensor:
    """CAMs (B, K, h, w) -> int64 labels (B, h, w): argmax of min-max normalised CAMs.

    With scope="image" (reference behaviour) the output of :func:`add_background_channel`
    passes through unchanged in ranking; scope="concept" stretches every channel to [0, 1]
    first, which would also stretch a background channel.
    """
    return normalize_cams(cams, scope).argmax(dim=1)
