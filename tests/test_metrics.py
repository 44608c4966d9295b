"""SegmentationMetrics against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import SegmentationMetrics


def test_permuted_perfect_prediction_scores_100():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(4, 16, 16))
    perm = np.array([3, 0, 4, 1, 2])  # cluster id = perm[class]
    m = SegmentationMetrics(5)
    m.update(perm[target], target)
    res = m.compute()
    assert res["miou"] == pytest.approx(100.0)
    assert res["pixel_accuracy"] == pytest.approx(100.0)
    assert res["per_class_iou"] == pytest.approx([100.0] * 5)
    # cluster perm[c] must be matched back to class c
    assert [res["matching"][perm[c]] for c in range(5)] == list(range(5))
    assert np.array_equal(m.remap(perm[target]), target)


def test_hand_computed_3x3():
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([1, 1, 0, 0, 0, 2, 2, 2, 1])
    # hist[cluster, class]: c0 = [1, 2, 0], c1 = [2, 0, 1], c2 = [0, 0, 3]
    # best matching: c0 -> 1, c1 -> 0, c2 -> 2 (2 + 2 + 3 = 7 matched pixels)
    # confusion (true x predicted): [[2, 1, 0], [0, 2, 0], [1, 0, 3]]
    # IoU: 2 / (3 + 3 - 2) = 0.5, 2 / (2 + 3 - 2) = 2/3, 3 / (4 + 3 - 3) = 3/4
    m = SegmentationMetrics(3)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))  # tensors accepted
    res = m.compute()
    assert res["matching"] == [1, 0, 2]
    assert res["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 3]]
    assert res["per_class_iou"] == pytest.approx([50.0, 200 / 3, 75.0])
    assert res["miou"] == pytest.approx((50.0 + 200 / 3 + 75.0) / 3)
    assert res["pixel_accuracy"] == pytest.approx(700 / 9)
    assert res["num_pixels"] == 9


def test_accumulates_over_batches_like_one_update():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, size=(6, 8, 8))
    pred = rng.integers(0, 4, size=(6, 8, 8))
    one, many = SegmentationMetrics(4), SegmentationMetrics(4)
    one.update(pred, target)
    for p, t in zip(pred, target):
        many.update(p, t)
    assert one.compute() == many.compute()


def test_ignore_pixels_are_excluded():
    target = np.array([[0, 1, 255], [255, 1, 0]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [0, 1, 0]])
    m = SegmentationMetrics(2)
    m.update(pred, target)
    res = m.compute()
    assert res["num_pixels"] == 4
    assert res["miou"] == pytest.approx(100.0)
    assert res["pixel_accuracy"] == pytest.approx(100.0)


def test_more_clusters_than_classes_unmatched_cluster_counts_as_wrong():
    target = np.array([0, 0, 1, 1, 1, 0])
    pred = np.array([0, 0, 1, 1, 2, 2])
    # hist: c0 = [2, 0], c1 = [0, 2], c2 = [1, 1]; c2 stays unmatched
    m = SegmentationMetrics(2, num_clusters=3)
    m.update(pred, target)
    res = m.compute()
    assert res["matching"] == [0, 1, -1]
    assert res["per_class_iou"] == pytest.approx([200 / 3, 200 / 3])  # 2 / (3 + 2 - 2)
    assert res["pixel_accuracy"] == pytest.approx(400 / 6)
    assert res["confusion"] == [[2, 0], [0, 2]]
    assert m.remap(pred).tolist() == [0, 0, 1, 1, 255, 255]


def test_fewer_clusters_than_classes_unmatched_class_has_zero_iou():
    m = SegmentationMetrics(2, num_clusters=1)
    m.update(np.array([0, 0, 0]), np.array([0, 0, 1]))
    res = m.compute()
    assert res["per_class_iou"] == pytest.approx([200 / 3, 0.0])
    assert res["miou"] == pytest.approx(100 / 3)


def test_absent_class_is_undefined_and_left_out_of_the_mean():
    m = SegmentationMetrics(3)
    m.update(np.array([0, 1, 1]), np.array([0, 1, 1]))
    res = m.compute()
    assert res["per_class_iou"][2] is None
    assert res["miou"] == pytest.approx(100.0)


def test_bad_inputs_raise():
    m = SegmentationMetrics(2)
    with pytest.raises(ValueError):
        m.update(np.array([0, 1]), np.array([0, 2]))  # class 2 out of range
    with pytest.raises(ValueError):
        m.update(np.array([0, 5]), np.array([0, 1]))  # cluster out of range
    with pytest.raises(ValueError):
        m.compute()  # nothing accumulated
