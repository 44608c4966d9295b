"""The training losses: targets from the CAMs (and the teacher), cross-entropy's companions
(uncertainty, diversity) and the peer loss. CAMs are normalised with the one normaliser
of the project, :func:`pipeline.cam.normalize_cams`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pseudo_targets(cams_norm: Tensor, teacher_logits: Tensor | None = None, teacher_mix: float = 0.5) -> tuple[Tensor, Tensor]:
    """Soft scores and hard targets.

    cams_norm (B, K, h, w) in [0, 1]; teacher_logits (B, K, h, w) or None.
    Returns (scores (B, K, h, w), targets (B, h, w) int64 argmax over K).
    """
    scores = cams_norm
    if teacher_logits is not None:
        scores = teacher_mix * teacher_logits.softmax(dim=1) + (1 - teacher_mix) * cams_norm
    return scores, scores.argmax(dim=1)


def uncertainty_loss(logits: Tensor) -> Tensor:
    """Mean over pixels of 1 - (p_top1 - p_top2); logits (B, K, h, w); value in [0, 1]."""
    if logits.shape[1] < 2:
        return logits.new_zeros(())
    top2 = logits.softmax(dim=1).topk(2, dim=1).values
    return (1 - (top2[:, 0] - top2[:, 1])).mean()


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
    perm = torch.randperm(scores.shape[1], generator=generator).to(logits.device)
    return alpha * F.cross_entropy(logits, scores[:, perm].argmax(dim=1))
