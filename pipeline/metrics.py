"""Unsupervised segmentation metrics: one confusion matrix, one Hungarian matching.

The protocol (method.md, "Evaluation protocol"): accumulate a single confusion
matrix of predicted clusters against ground-truth classes over the WHOLE split,
then match clusters to classes once with the Hungarian algorithm (maximising the
number of matched pixels). Per-image matching would flatter the model, so there is
deliberately no per-image API.

Conventions:
- ``hist[k, c]`` counts pixels predicted as cluster ``k`` whose label is class ``c``
  (shape ``(num_clusters, num_classes)``).
- When ``num_clusters != num_classes`` the matching is rectangular: a cluster left
  unmatched maps to no class, so all of its pixels count as wrong (they add to the
  false negatives of their true class and to nobody's false positives); a class left
  unmatched has IoU 0 if it occurs in the labels.
- IoU of a class that neither occurs in the labels nor is predicted is undefined:
  it is reported as ``None`` and left out of the mean (``nanmean``, as the reference).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["SegmentationMetrics"]


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class SegmentationMetrics:
    """Accumulates a clusters x classes confusion matrix and scores it after matching.

    Args:
        num_classes: number of ground-truth classes C (labels ``0..C-1``).
        num_clusters: number of predicted clusters K (predictions ``0..K-1``);
            defaults to ``num_classes``.
        ignore_index: label value excluded from every count (255 by convention).
    """

    def __init__(self, num_classes: int, num_clusters: int | None = None, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_clusters = int(num_clusters if num_clusters is not None else num_classes)
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {self.num_clusters}")
        self.ignore_index = int(ignore_index)
        self.hist = np.zeros((self.num_clusters, self.num_classes), dtype=np.int64)
        self._matching: np.ndarray | None = None

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.hist[:] = 0
        self._matching = None

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: cluster ids, any integer shape, values in ``[0, num_clusters)``.
            target: class ids of the same shape, values in ``[0, num_classes)`` or
                ``ignore_index``.
        """
        pred = _as_numpy(pred).reshape(-1)
        target = _as_numpy(target).reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"pred has {pred.size} pixels but target has {target.size}")
        keep = target != self.ignore_index
        pred = pred[keep].astype(np.int64, copy=False)
        target = target[keep].astype(np.int64, copy=False)
        if pred.size == 0:
            return
        # Out-of-range ids would silently land in a neighbour's bin of the flat bincount.
        if target.min() < 0 or target.max() >= self.num_classes:
            raise ValueError(
                f"target has class ids outside [0, {self.num_classes}) other than "
                f"ignore_index={self.ignore_index}: min {target.min()}, max {target.max()}"
            )
        if pred.min() < 0 or pred.max() >= self.num_clusters:
            raise ValueError(
                f"pred has cluster ids outside [0, {self.num_clusters}): min {pred.min()}, max {pred.max()}"
            )
        flat = pred * self.num_classes + target
        counts = np.bincount(flat, minlength=self.num_clusters * self.num_classes)
        self.hist += counts.reshape(self.num_clusters, self.num_classes)
        self._matching = None

    def matching(self) -> np.ndarray:
        """Hungarian matching of the accumulated matrix: ``(num_clusters,)`` class id per
        cluster, ``-1`` for clusters left unmatched."""
        if self._matching is None:
            rows, cols = linear_sum_assignment(self.hist, maximize=True)
            match = np.full(self.num_clusters, -1, dtype=np.int64)
            match[rows] = cols
            self._matching = match
        return self._matching

    def remap(self, pred: np.ndarray | torch.Tensor) -> np.ndarray:
        """Map cluster ids to class ids with the current matching.

        Pixels of unmatched clusters become ``ignore_index``. Returns an int64 array
        of ``pred``'s shape.
        """
        pred = _as_numpy(pred).astype(np.int64, copy=False)
        lut = self.matching().copy()
        lut[lut < 0] = self.ignore_index
        return lut[pred]

    def compute(self) -> dict[str, Any]:
        """Scores after one Hungarian matching over everything accumulated.

        Returns a JSON-ready dict:
            miou: mean IoU over classes with a defined IoU, percent.
            pixel_accuracy: matched pixels / all labelled pixels, percent.
            per_class_iou: list of C floats (percent) or None (class absent and never predicted).
            matching: list of K class ids, -1 for an unmatched cluster.
            confusion: C x C list, rows = true class, columns = predicted (matched) class;
                pixels of unmatched clusters are not in it.
            num_pixels: labelled pixels counted.
        """
        total = int(self.hist.sum())
        if total == 0:
            raise ValueError("no labelled pixels were accumulated; nothing to score")
        match = self.matching()
        confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        matched = np.flatnonzero(match >= 0)
        # Row k of hist (cluster k) becomes column match[k] (its class) of the confusion.
        confusion[:, match[matched]] = self.hist[matched].T
        tp = np.diag(confusion).astype(np.float64)
        gt = self.hist.sum(axis=0).astype(np.float64)  # includes pixels of unmatched clusters
        predicted = confusion.sum(axis=0).astype(np.float64)
        union = gt + predicted - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        valid = ~np.isnan(iou)
        miou = float(iou[valid].mean() * 100) if valid.any() else float("nan")
        return {
            "miou": miou,
            "pixel_accuracy": float(tp.sum() / total * 100),
            "per_class_iou": [float(v * 100) if ok else None for v, ok in zip(iou, valid)],
            "matching": [int(c) for c in match],
            "confusion": confusion.tolist(),
            "num_pixels": total,
        }
