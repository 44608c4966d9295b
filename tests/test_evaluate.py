"""Evaluation protocols, score -> prediction geometry, bottom-up baseline, dense CRF."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate import (PROTOCOLS, BottomUp, dense_crf, label_in_protocol,
                               score_to_prediction)
from pipeline.store import create_feature_store


def test_protocols_registered():
    assert {"reference", "native", "stego"} <= set(PROTOCOLS.names())
    with pytest.raises(ValueError, match="unknown evaluation protocol 'x'"):
        PROTOCOLS.get("x")


@pytest.mark.parametrize("name, expected", [("reference", (32, 48)), ("native", (60, 90)), ("stego", (320, 320))])
def test_label_geometry_per_protocol(name, expected):
    label = np.zeros((60, 90), dtype=np.uint8)
    assert label_in_protocol(label, (32, 48), PROTOCOLS.get(name)).shape == expected


def test_stego_crops_the_centre_after_shortest_side_320():
    label = np.zeros((100, 200), dtype=np.uint8)
    label[:, :50] = 1                      # left quarter: cut away by the centre crop
    label[:, 50:150] = 2
    out = label_in_protocol(label, (32, 32), PROTOCOLS.get("stego"))
    assert out.shape == (320, 320) and set(np.unique(out)) == {2}


def test_scores_upsampled_to_the_protocol_size():
    scores = torch.zeros(2, 2, 3)
    scores[1, :, 2] = 1.0                  # right column -> cluster 1
    pred = score_to_prediction(scores, (20, 30), (8, 12), PROTOCOLS.get("reference"))
    assert pred.shape == (8, 12)
    assert (pred[:, :6] == 0).all() and (pred[:, -2:] == 1).all()
    assert score_to_prediction(scores, (20, 30), (8, 12), PROTOCOLS.get("native")).shape == (20, 30)


def test_bottom_up_recovers_two_feature_clusters(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    patch = np.empty((4, 4, 6, 8), dtype=np.float32)
    truth = np.zeros((4, 4, 6), dtype=int)
    truth[:, :, 3:] = 1
    patch[truth == 0], patch[truth == 1] = a, b
    patch += rng.normal(scale=0.01, size=patch.shape).astype(np.float32)
    root = create_feature_store(tmp_path / "f.zarr", n_images=4, grid=(4, 6), dim=8, n_crop_images=0,
                                windows_per_image=1, attrs={})
    root["patch"][:] = patch.astype(np.float16)
    model = BottomUp(root, np.arange(3), k=2, seed=0)
    pred = model.scores(root["patch"][3]).argmax(0).numpy()
    assert len(np.unique(pred[:, :3])) == 1 and len(np.unique(pred[:, 3:])) == 1
    assert pred[0, 0] != pred[0, 5]


def test_dense_crf_snaps_a_blurry_boundary_to_the_image_edge():
    pytest.importorskip("pydensecrf", reason="pydensecrf2 not installed (pip install -e '.[crf]')")
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:, 20:] = 255                    # a sharp edge at column 20
    ramp = np.clip((np.arange(40) - 15) / 16, 0.05, 0.95)   # blurry, and centred at column 23
    probs = np.stack([1 - ramp, ramp])[:, None, :].repeat(40, axis=1).astype(np.float32)
    assert (probs.argmax(0)[:, 20:23] == 0).all()           # without the CRF the boundary is off
    refined = dense_crf(image, probs).argmax(0)
    assert (refined[:, :20] == 0).all() and (refined[:, 20:] == 1).all()


def test_model_scores_run_each_batch_once_and_hold_one():
    from pipeline.evaluate import ModelScores

    calls = []

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x[:, :2] * 2

    def images_of(batch):
        calls.append(list(batch))
        return torch.stack([torch.full((3, 2, 2), float(i)) for i in batch])

    scores = ModelScores(Doubler(), images_of, [5, 7, 9, 11, 13], batch_size=2, device=torch.device("cpu"))
    assert scores.num_clusters == 2
    values = [float(scores(i)[0, 0, 0]) for i in [5, 7, 9, 11, 13]]
    assert values == [10.0, 14.0, 18.0, 22.0, 26.0]
    assert calls == [[5, 7], [9, 11], [13]]           # each batch once, num_clusters included
    assert len(scores._cache) == 1
