"""Crop windows, thing/stuff classification and FAISS concept discovery."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.concepts import Concepts, discover_concepts
from pipeline.config import ConceptsConfig
from pipeline.features import classify_windows, sliding_windows, window_positions
from pipeline.store import CROP_KINDS, create_feature_store


def test_window_positions_snap_last_window_to_border():
    assert window_positions(640, 192, 96) == [0, 96, 192, 288, 384, 448]
    assert window_positions(640, 320, 160) == [0, 160, 320]
    assert window_positions(100, 200, 100) == [0]


@pytest.mark.parametrize("size, fractions, expected", [
    ((640, 640), [0.5, 0.4, 0.3, 0.2], 142),      # COCO, as reported by the paper
    ((640, 1280), [0.5, 0.4, 0.3, 0.2], 306),     # Cityscapes, as reported by the paper
])
def test_window_counts_match_the_paper(size, fractions, expected):
    boxes = sliding_windows(*size, fractions, 0.5)
    assert len(boxes) == expected
    assert (boxes[:, 2] <= size[0]).all() and (boxes[:, 3] <= size[1]).all()
    assert ((boxes[:, 2] - boxes[:, 0]) == (boxes[:, 3] - boxes[:, 1])).all()


def test_classify_windows_thing_stuff_and_neither():
    fg = np.zeros((10, 10), dtype=bool)
    fg[:, :5] = True                                   # left half foreground
    boxes = np.array([[0, 0, 4, 4], [0, 6, 4, 10], [0, 3, 4, 7]], dtype=np.int32)
    kind, share = classify_windows(fg, boxes, thing_fraction=0.5, stuff_fraction=0.8)
    assert share.tolist() == [1.0, 0.0, 0.5]
    assert kind.tolist() == [CROP_KINDS["thing"], CROP_KINDS["stuff"], CROP_KINDS["none"]]


def _store_with_blobs(tmp_path, n_per_blob=200, dim=8, seed=0):
    """Crop embeddings drawn around 3 thing and 2 stuff centres, well separated."""
    rng = np.random.default_rng(seed)
    thing_centres = rng.normal(size=(3, dim)) * 10
    stuff_centres = rng.normal(size=(2, dim)) * 10
    emb = np.concatenate([c + rng.normal(size=(n_per_blob, dim)) for c in [*thing_centres, *stuff_centres]])
    kind = np.repeat([1, 1, 1, 2, 2], n_per_blob).astype(np.uint8)
    rows = len(emb) + 10                               # 10 rows of "none" crops at the end
    root = create_feature_store(tmp_path / "f.zarr", n_images=rows // 10, grid=(1, 1), dim=dim,
                                windows_per_image=10, attrs={})
    root["crops/embedding"][:] = np.concatenate([emb, np.zeros((rows - len(emb), dim))]).astype(np.float16)
    root["crops/kind"][:] = np.concatenate([kind, np.zeros(rows - len(emb), np.uint8)])
    truth = np.repeat(np.arange(5), n_per_blob)
    return root, truth


def test_discover_concepts_finds_the_blobs_per_pool(tmp_path):
    store, truth = _store_with_blobs(tmp_path)
    found = discover_concepts(store, ConceptsConfig(k={"thing": 3, "stuff": 2}, iterations=20, restarts=5, seed=0))
    assert found.centroids.shape == (5, 8)
    assert found.pools == ["thing"] * 3 + ["stuff"] * 2
    assert (found.assignment[-10:] == -1).all()
    assigned = found.assignment[: len(truth)]
    # thing crops go to thing concepts only, stuff to stuff
    assert (assigned[truth < 3] < 3).all() and (assigned[truth >= 3] >= 3).all()
    # each blob is one concept: a perfect clustering up to permutation
    for blob in range(5):
        assert len(np.unique(assigned[truth == blob])) == 1
    assert sorted(found.sizes.tolist()) == [200] * 5


def test_discover_concepts_is_deterministic_and_roundtrips(tmp_path):
    store, _ = _store_with_blobs(tmp_path)
    cfg = ConceptsConfig(k={"thing": 3, "stuff": 2}, iterations=10, seed=3)
    a, b = discover_concepts(store, cfg), discover_concepts(store, cfg)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    a.save(tmp_path / "concepts", {"seed": 3})
    loaded = Concepts.load(tmp_path / "concepts")
    np.testing.assert_array_equal(loaded.centroids, a.centroids)
    assert loaded.fingerprint() == a.fingerprint()


def test_pool_without_crops_is_a_clear_error(tmp_path):
    store, _ = _store_with_blobs(tmp_path)
    with pytest.raises(ValueError, match="no 'all' crops"):
        discover_concepts(store, ConceptsConfig(k={"all": 3}))
    with pytest.raises(ValueError, match="cannot make 500 clusters"):
        discover_concepts(store, ConceptsConfig(k={"stuff": 500}))
