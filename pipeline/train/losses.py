"""The training losses: targets from the CAMs (and the teacher), cross-entropy's companions
(uncertainty, diversity) and the peer loss. CAMs are normalised with the one normaliser
of the project, :func:`pipeline.cam.normalize_cams`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.cam import normalize_cams
from pipeline.runtime import to_device


def pseudo_targets(cams_norm: Tensor, teacher_logits: Tensor | None = None, teacher_mix: float = 0.5) -> tuple[Tensor, Tensor]:
    """Soft scores and hard targets.

    cams_norm (B, K, h, w) in [0, 1]; teacher_logits (B, K, h, w) or None.
    Returns (scores (B, K, h, w), targets (B, h, w) int64 argmax over K).
    """
    scores = cams_norm
    if teacher_logits is not None:
        scores = teacher_mix * teacher_logits.softmax(dim=1) + (1 - teacher_mix) * cams_norm
    return scores, scores.argmax(dim=1)


def crop_cam_scores(cams: Tensor, scope: str = "image",
                    background_threshold: float | None = None) -> tuple[Tensor, Tensor | None]:
    """The CAMs of a batch of augmented crops as scores in [0, 1], before any teacher.

    Args:
        cams: (B, C, h, w) CAMs cropped with the images. Thing-stuff sets: C = K concepts.
            Object-centric sets (``background_threshold`` given): C = K + 1, the last channel
            the background the pseudolabels stage computed on the full image.
        scope: min-max scope of pipeline.cam.normalize_cams ("image": one min/max per crop).
        background_threshold: None for thing-stuff sets; else the object-centric rule of the
            reference (models/loss/BootstrappingLoss.py, things_bootstrap_loss): the stored
            background is dropped, the crop's K concept CAMs are normalised together, the
            background is recomputed on the crop as relu(threshold - max), and the K + 1
            channels are not normalised again.
    Returns:
        scores (B, C, h, w); foreground (B, h, w) bool, pixels where some normalised concept CAM
        exceeds the threshold (object-centric only, else None).
    """
    if background_threshold is None:
        return normalize_cams(cams, scope), None
    concepts = normalize_cams(cams[:, :-1], scope)
    background = (background_threshold - concepts.amax(dim=1, keepdim=True)).clamp_min(0)
    return torch.cat([concepts, background], dim=1), (concepts > background_threshold).any(dim=1)


def uncertainty_loss(logits: Tensor, where: Tensor | None = None) -> Tensor:
    """Mean of 1 - (p_top1 - p_top2) over pixels; logits (B, K, h, w); value in [0, 1].

    where: (B, h, w) bool, average over those pixels only (0 when there is none): the
    object-centric loss takes the foreground logits and the foreground pixels (reference).
    """
    if logits.shape[1] < 2:
        return logits.new_zeros(())
    top2 = logits.softmax(dim=1).topk(2, dim=1).values
    margin = 1 - (top2[:, 0] - top2[:, 1])
    if where is None:
        return margin.mean()
    return (margin * where).sum() / where.sum().clamp_min(1)   # no host sync for an empty mask


def diversity_loss(class_embeddings: Tensor) -> Tensor:
    """Mean over samples and class pairs i < j of (1 + cos(e_i, e_j)).

    class_embeddings (B, K, d). 1 for orthogonal embeddings, 0 only if antipodal.
    """
    k = class_embeddings.shape[1]
    if k < 2:
        return class_embeddings.new_zeros(())
    e = F.normalize(class_embeddings.float(), dim=-1)
    sim = e @ e.transpose(1, 2)
    i, j = torch.triu_indices(k, k, offset=1, device=e.device)
    return (1 + sim[:, i, j]).mean()


def peer_loss(logits: Tensor, scores: Tensor, alpha: float, generator: torch.Generator) -> Tensor:
    """alpha x CE against a target whose classes are randomly relabelled (one permutation
    per batch): it penalises fitting noise confidently. logits, scores (B, K, h, w)."""
    perm = to_device(torch.randperm(scores.shape[1], generator=generator), logits.device)
    return alpha * F.cross_entropy(logits, scores[:, perm].argmax(dim=1))
