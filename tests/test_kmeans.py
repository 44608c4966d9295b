"""k-means over every crop with bounded memory: FAISS (in memory or streamed Lloyd), MiniBatchKMeans,
centroids recomputed as member means, the CPU settings' subsampled k-means kept byte for byte."""
from __future__ import annotations

import tracemalloc

import faiss
import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from pipeline.concepts import discover_concepts, faiss_uses_gpu, lloyd, pool_rows, read_pool
from pipeline.config import ConceptsConfig
from pipeline.errors import InputError
from pipeline.settings import SETTINGS
from pipeline.store import create_feature_store, read_rows


def _store(tmp_path, groups, *, dim=8, spread=10.0, rows_per_chunk=100, seed=0, name="f.zarr"):
    """Feature store whose crops are `groups` = [(kind, n_points, n_blobs)], each a set of Gaussian blobs
    (spread 0: one shapeless Gaussian cloud), in float16-exact values (held float16, they are unchanged).

    Returns the store, the embeddings (M, D) float32 and the blob of each row (-1: none crop)."""
    rng = np.random.default_rng(seed)
    emb, kind, blob, next_blob = [], [], [], 0
    for k, n, blobs in groups:
        centres = rng.normal(size=(blobs, dim)) * spread
        which = np.arange(n) % blobs
        emb.append(centres[which] + rng.normal(size=(n, dim)))
        kind.append(np.full(n, k, dtype=np.uint8))
        blob.append(which + next_blob)
        next_blob += blobs
    emb = np.concatenate(emb).astype(np.float16).astype(np.float32)
    kind, blob = np.concatenate(kind), np.concatenate(blob)
    total = -(-len(emb) // rows_per_chunk) * rows_per_chunk     # padded with "none" crops
    root = create_feature_store(tmp_path / name, n_images=total // rows_per_chunk, grid=(1, 1), dim=dim,
                                windows_per_image=rows_per_chunk, attrs={})
    padding = total - len(emb)
    root["crops/embedding"][:] = np.concatenate([emb, np.zeros((padding, dim))]).astype(np.float16)
    root["crops/kind"][:] = np.concatenate([kind, np.zeros(padding, np.uint8)])
    return root, np.concatenate([emb, np.zeros((padding, dim), np.float32)]), np.concatenate([blob, -np.ones(padding, int)])


def _one_blob_per_concept(assignment, blob):
    """Every blob is one concept and no two blobs share one."""
    pairs = {(int(b), int(a)) for b, a in zip(blob[blob >= 0], assignment[blob >= 0])}
    return len(pairs) == len({b for b, _ in pairs}) == len({a for _, a in pairs})


# ----------------------------------------------------------------------------- config and settings
def test_config_validates_algorithm_and_points_per_centroid():
    with pytest.raises(ValueError, match="algorithm must be one of faiss, minibatch; got 'kmeans'"):
        ConceptsConfig(algorithm="kmeans")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_points_per_centroid must be a positive integer or null"):
            ConceptsConfig(max_points_per_centroid=bad)
    assert ConceptsConfig().max_points_per_centroid is None and ConceptsConfig().recompute_centroids


def test_settings_give_the_references_clustering():
    for name in ("cocostuff27", "cocostuff171", "cocostuff27_curated", "coco80", "voc21"):
        concepts = SETTINGS.get(name).params()["concepts"]
        assert (concepts["max_points_per_centroid"], concepts["algorithm"], concepts["recompute_centroids"]) == \
            (None, "faiss", True), name
    for name in ("cityscapes27", "lip5", "lip16", "lip19"):
        concepts = SETTINGS.get(name).params()["concepts"]
        assert (concepts["max_points_per_centroid"], concepts["algorithm"], concepts["restarts"],
                concepts["recompute_centroids"]) == (None, "minibatch", 3, True), name
    for name in ("demo", "camvid", "folder"):                  # the README's measured figures
        concepts = SETTINGS.get(name).params()["concepts"]
        assert (concepts["max_points_per_centroid"], concepts["algorithm"], concepts["recompute_centroids"],
                concepts["restarts"], concepts["iterations"]) == (256, "faiss", False, 1, 100), name


# ----------------------------------------------------------------------------- the CPU settings, unchanged
def test_subsampled_kmeans_is_todays_byte_for_byte(tmp_path):
    """max_points_per_centroid 256, no recomputation (demo, camvid, folder): the same sample, FAISS
    call and assignment as before every-crop clustering existed, so the same bytes."""
    store, emb, _ = _store(tmp_path, [(1, 700, 4), (2, 300, 3)], spread=1.0)
    cfg = ConceptsConfig(k={"thing": 2, "stuff": 3}, iterations=20, seed=4, max_points_per_centroid=256,
                         algorithm="faiss", recompute_centroids=False)
    found = discover_concepts(store, cfg, read_chunk=128)
    # what discover_concepts did before (commit 8003f1e)
    kinds, rng = read_rows(store, "crops/kind"), np.random.default_rng(cfg.seed)
    centroids, assignment, offset = [], np.full(len(kinds), -1, dtype=np.int32), 0
    for pool, k in cfg.k.items():
        rows = pool_rows(kinds, pool)
        sample = np.sort(rng.choice(rows, size=min(k * 256, len(rows)), replace=False))
        model = faiss.Kmeans(emb.shape[1], k, niter=cfg.iterations, seed=cfg.seed, verbose=False,
                             gpu=faiss_uses_gpu(), max_points_per_centroid=256, nredo=1, spherical=False)
        model.train(read_rows(store, "crops/embedding", sample))
        assignment[rows] = model.index.search(read_rows(store, "crops/embedding", rows), 1)[1][:, 0] + offset
        centroids.append(model.centroids.copy())
        offset += k
    assert found.trained_on == {"thing": 512, "stuff": 300}     # thing: subsampled
    assert found.centroids.tobytes() == np.concatenate(centroids).astype(np.float32).tobytes()
    np.testing.assert_array_equal(found.assignment, assignment)


# ----------------------------------------------------------------------------- every crop
def test_every_crop_trains_kmeans_by_default(tmp_path):
    store, emb, _ = _store(tmp_path, [(3, 2000, 1)], dim=6, spread=0.0)    # one cloud: where the sample matters
    k, cfg = 5, dict(iterations=8, seed=1, recompute_centroids=False)
    every = discover_concepts(store, ConceptsConfig(k={"all": k}, **cfg))
    reference = faiss.Kmeans(6, k, niter=8, seed=1, max_points_per_centroid=10_000_000)   # utils/kmeans.py
    reference.train(emb[:2000])
    assert every.trained_on == {"all": 2000}
    np.testing.assert_array_equal(every.centroids, reference.centroids)
    assert every.objective["all"] == pytest.approx(reference.obj[-1], rel=1e-6)
    np.testing.assert_array_equal(every.assignment, reference.index.search(emb, 1)[1][:, 0])
    sampled = discover_concepts(store, ConceptsConfig(k={"all": k}, max_points_per_centroid=50, **cfg))
    assert sampled.trained_on == {"all": 250}
    assert not np.allclose(sampled.centroids, every.centroids, atol=1e-3)


def test_streamed_lloyd_equals_in_memory_faiss(tmp_path):
    store, emb, blob = _store(tmp_path, [(1, 900, 3), (2, 600, 4)], rows_per_chunk=150)
    cfg = ConceptsConfig(k={"thing": 3, "stuff": 4}, iterations=15, restarts=2, seed=2)
    assert read_pool(store, np.arange(1500), memory_budget=0).dtype == np.float16
    assert read_pool(store, np.arange(1500)).dtype == np.float32
    in_memory = discover_concepts(store, cfg)
    streamed = discover_concepts(store, cfg, read_chunk=64, memory_budget=0)       # float16, 64-row chunks
    np.testing.assert_array_equal(streamed.assignment, in_memory.assignment)
    np.testing.assert_allclose(streamed.centroids, in_memory.centroids, rtol=1e-5, atol=1e-5)
    for pool in cfg.k:
        assert streamed.objective[pool] == pytest.approx(in_memory.objective[pool], rel=1e-5)
    assert _one_blob_per_concept(streamed.assignment, blob)


def test_lloyd_matches_faiss_including_empty_cluster_splits():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(3000, 16)).astype(np.float32)
    reference = faiss.Kmeans(16, 10, niter=12, seed=7, nredo=3, max_points_per_centroid=3000)
    reference.train(cloud)
    centroids, objs = lloyd(cloud, 10, iterations=12, seed=7, restarts=3, chunk=500)
    np.testing.assert_allclose(centroids, reference.centroids, atol=1e-5)
    assert objs[-1] == pytest.approx(reference.obj[-1], rel=1e-5)      # faiss sums it in float32
    # 3 distinct points repeated: initial centroids coincide, clusters come out empty and are split
    points = np.repeat(np.array([[0, 0], [10, 10], [20, 0]], np.float32), [60, 30, 10], axis=0)
    reference = faiss.Kmeans(2, 4, niter=5, seed=0, max_points_per_centroid=1000)
    reference.train(points)
    assert sum(stats["nsplit"] for stats in reference.iteration_stats) > 0
    centroids, _ = lloyd(points, 4, iterations=5, seed=0, chunk=7)
    np.testing.assert_allclose(centroids, reference.centroids, atol=1e-5)


# ----------------------------------------------------------------------------- recomputed centroids
@pytest.mark.parametrize("options", [{}, {"memory_budget": 0}, {"max_points_per_centroid": 40},
                                     {"algorithm": "minibatch"}])
def test_recomputed_centroids_are_the_mean_of_their_members(tmp_path, options):
    store, emb, _ = _store(tmp_path, [(1, 800, 1), (2, 500, 1)], spread=0.0)
    options = dict(options)
    budget = options.pop("memory_budget", 1 << 30)
    cfg = dict(k={"thing": 4, "stuff": 3}, iterations=2, seed=0, **options)       # 2 steps: far from converged
    found = discover_concepts(store, ConceptsConfig(recompute_centroids=True, **cfg), memory_budget=budget)
    means = np.stack([emb[found.assignment == j].astype(np.float64).mean(0) for j in range(found.k)])
    np.testing.assert_allclose(found.centroids, means, rtol=1e-6, atol=1e-6)
    kept = discover_concepts(store, ConceptsConfig(recompute_centroids=False, **cfg), memory_budget=budget)
    np.testing.assert_array_equal(kept.assignment, found.assignment)   # the same members
    assert not np.allclose(kept.centroids, means, atol=1e-4)


# ----------------------------------------------------------------------------- MiniBatchKMeans
def test_minibatch_is_the_references_call_and_recovers_blobs(tmp_path):
    store, emb, blob = _store(tmp_path, [(3, 600, 3)])
    cfg = ConceptsConfig(k={"all": 3}, algorithm="minibatch", iterations=100, seed=0, recompute_centroids=False)
    found = discover_concepts(store, cfg)
    reference = MiniBatchKMeans(n_clusters=3, max_iter=100, random_state=0, n_init=1).fit(emb[:600])
    np.testing.assert_array_equal(found.centroids, reference.cluster_centers_)
    np.testing.assert_array_equal(found.assignment, reference.labels_)
    assert _one_blob_per_concept(found.assignment, blob)
    streamed = discover_concepts(store, cfg, memory_budget=0)                     # partial_fit on float16
    assert _one_blob_per_concept(streamed.assignment, blob)
    assert sorted(streamed.sizes.tolist()) == [200, 200, 200]
    assert streamed.trained_on == found.trained_on == {"all": 600}


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("algorithm", ["faiss", "minibatch"])
def test_peak_memory_is_the_float16_pool_plus_chunks(tmp_path, algorithm):
    n, dim, chunk = 40000, 128, 512
    store, _, _ = _store(tmp_path, [(3, n, 4)], dim=dim, rows_per_chunk=1000)
    cfg = ConceptsConfig(k={"all": 4}, iterations=3, algorithm=algorithm)
    tracemalloc.start()
    try:
        discover_concepts(store, cfg, read_chunk=chunk, memory_budget=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float32_pool = n * dim * 4
    # the float16 pool, a few int arrays per crop, and a few chunks (read_chunk rows, or one zarr chunk)
    bound = n * dim * 2 + n * 32 + 8 * 1000 * dim * 4
    assert bound < float32_pool                  # so a float32 copy of the pool would fail the test
    assert peak < bound, (peak, bound)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_a_damaged_chunk_is_named_while_reading_every_crop(tmp_path, budget):
    store, _, _ = _store(tmp_path, [(3, 400, 2)])
    path = tmp_path / "f.zarr" / "crops" / "embedding" / "c.2.0"
    assert path.exists()
    path.write_bytes(b"not a shard")
    with pytest.raises(InputError, match=r"array 'crops/embedding': shard c\.2\.0 \(rows 200\.\.299\) cannot be decoded"):
        discover_concepts(store, ConceptsConfig(k={"all": 2}, iterations=2), read_chunk=128, memory_budget=budget)


def test_two_faiss_builds_installed_together_are_reported(monkeypatch):
    # faiss-cpu and faiss-gpu both install faiss/: the later overwrites the other, usually into a
    # CPU build that runs silently; the concepts stage says so, with the fix.
    from importlib import metadata

    from pipeline.concepts import faiss_install_problem

    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    monkeypatch.setattr(metadata, "distributions", lambda: [Dist("faiss-cpu"), Dist("faiss-gpu-cu12"), Dist("numpy")])
    problem = faiss_install_problem(cuda=True)
    assert "faiss-cpu and faiss-gpu-cu12 are all installed" in problem and "pip uninstall -y" in problem
    monkeypatch.setattr(metadata, "distributions", lambda: [Dist("faiss-cpu")])
    if not faiss_uses_gpu():
        assert "CUDA is available but this faiss build has no GPU support" in faiss_install_problem(cuda=True)
    assert faiss_install_problem(cuda=False) is None


def test_the_base_install_has_no_faiss_and_the_extras_are_exclusive():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"]] == ["faiss-cpu"]
    assert [d.split(">")[0] for d in extras["gpu"]] == ["faiss-gpu-cu12"]
