"""Concept discovery: k-means over the crop embeddings, one pool at a time.

The pools are the crop kinds of the feature store (thing, stuff, or all): each is
clustered into its own number of concepts and the centroids are concatenated in
pool order (things first, as in the paper's COCO setting).

As the reference (utils/kmeans.py), k-means is trained on every crop of the pool
(`concepts.max_points_per_centroid: null`; an integer n trains on a random subsample of
k x n crops, FAISS' own subsampling), with FAISS (`concepts.algorithm: faiss`,
train_kmeans_faiss: COCO-Stuff, VOC) or sklearn's MiniBatchKMeans (`minibatch`,
train_kmeans: Cityscapes, LIP); every crop is then assigned to its nearest centroid and,
with `concepts.recompute_centroids`, each centroid becomes the mean of its members.

Memory stays bounded at COCO scale (16.8M crops x 384 float32 = 25.8 GB): a pool is read
from the store chunk by chunk (store.read_rows) and held as float32 only while that copy
fits `memory_budget` (MEMORY_BUDGET, 4 GiB); a larger pool is held as float16 (2 bytes per
value) and clustered by streaming float32 chunks of `read_chunk` rows through the
assignment and update steps (`lloyd`, or MiniBatchKMeans.partial_fit), so that no float32
copy of the whole pool is ever made. Per pool of N crops of dimension D:
  held pool       N x D x 4 bytes (float32, <= memory_budget) or N x D x 2 bytes (float16)
  per crop        4 bytes (int32 labels), plus 5 bytes per store row (kinds, assignment);
                  faiss.Kmeans in memory adds its own 12 bytes per crop (distances, labels)
  working chunk   read_chunk x D x 4 bytes (float32 chunk; 100 MB for 65,536 x 384), the
                  zarr read of one chunk, and read_chunk x 12 bytes of search results
e.g. a 16.8M-crop pool of 384-D crops: 12.9 GB (float16) + 67 MB + ~0.3 GB.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr

from pipeline.config import ConceptsConfig, Config
from pipeline.errors import InputError
from pipeline.files import atomic_write, commit, fingerprint, partial_path, remove, write_json
from pipeline.runtime import import_faiss, log
from pipeline.store import CROP_KINDS, check_provenance, open_features_of, read_rows

faiss = import_faiss()
POOL_ORDER = ("thing", "stuff", "all")
# Largest float32 copy of one pool held in memory (bytes); a larger pool is held as float16.
MEMORY_BUDGET = 4 * 2**30
MINIBATCH_SIZE = 1024                   # MiniBatchKMeans' batch_size (sklearn 1.0.1's default, as the reference)


def faiss_uses_gpu() -> bool:
    """True when this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


FAISS_PACKAGES = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")


def faiss_install_problem(cuda: bool | None = None) -> str | None:
    """Why k-means would silently run on the CPU, or None.

    The faiss wheels all install the same `faiss/` package, so with two of them installed the
    files of the last one win, usually leaving a CPU build; and a CPU build on a CUDA machine
    is a slow run nobody asked for.
    """
    from importlib import metadata

    installed = sorted({d.metadata["Name"].lower() for d in metadata.distributions()
                        if (d.metadata["Name"] or "").lower() in FAISS_PACKAGES})
    if len(installed) > 1:
        return (f"{' and '.join(installed)} are all installed and overwrite each other's faiss/ package: "
                f"pip uninstall -y {' '.join(installed)} && pip install -e '.[gpu]' (or '.[cpu]')")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda and not faiss_uses_gpu():
        return ("CUDA is available but this faiss build has no GPU support: k-means runs on the CPU; "
                "for the GPU: pip uninstall -y faiss-cpu && pip install -e '.[gpu]' (make install FAISS=gpu)")
    return None


@dataclass
class Concepts:
    """Centroids (K, D) with the pool each came from, plus what made them."""

    centroids: np.ndarray
    pools: list[str]                       # pool name of each concept, (K,)
    sizes: np.ndarray                      # crops assigned to each concept, (K,)
    assignment: np.ndarray                 # concept of each crop row, -1 outside every pool, (M,)
    objective: dict = field(default_factory=dict)   # final k-means objective per pool
    normalize: bool = False
    trained_on: dict = field(default_factory=dict)  # crops k-means was trained on, per pool

    @property
    def k(self) -> int:
        return len(self.centroids)

    def fingerprint(self) -> str:
        return fingerprint(np.round(self.centroids.astype(np.float64), 6).tolist())

    def save(self, folder: str | Path, meta: dict) -> Path:
        """`folder/concepts.npz` + `folder/concepts.json`, written together, atomically."""
        folder = Path(folder)
        partial = partial_path(folder)
        remove(partial)
        atomic_write(partial / "concepts.npz", lambda handle: np.savez(
            handle, centroids=self.centroids, pools=np.array(self.pools), sizes=self.sizes,
            assignment=self.assignment))
        write_json(partial / "concepts.json", {
            "k": self.k, "pools": self.pools, "sizes": self.sizes.tolist(),
            "objective": self.objective, "normalize": self.normalize, "trained_on": self.trained_on,
            "centroids_hash": self.fingerprint(), **meta,
        })
        return commit(partial, folder)

    @classmethod
    def load(cls, folder: str | Path, expected: dict | None = None) -> "Concepts":
        """The concepts saved in `folder`.

        Args:
            folder: holds concepts.npz and concepts.json.
            expected: keys concepts.json must have, e.g. {"backbone": ..., "weights_id": ...}:
                centroids are points of one backbone's embedding space and mean nothing in
                another's. None: no check.
        Raises:
            InputError: a file is missing. ProvenanceError: concepts.json differs from `expected`.
        """
        folder = Path(folder)
        npz_path, json_path = folder / "concepts.npz", folder / "concepts.json"
        for path in (npz_path, json_path):
            if not path.exists():
                raise InputError(path, "concepts not found; run the concepts stage first")
        meta = json.loads(json_path.read_text())
        if expected:
            check_provenance(json_path, meta, expected)
        with np.load(npz_path) as data:
            return cls(data["centroids"], [str(p) for p in data["pools"]], data["sizes"],
                       data["assignment"], meta.get("objective", {}), bool(meta.get("normalize", False)),
                       meta.get("trained_on", {}))


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)         # the store holds float16: normalise in float32
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pool_rows(kinds: np.ndarray, pool: str) -> np.ndarray:
    return np.flatnonzero(kinds == CROP_KINDS[pool])


def memory_needed(n_pool: int, n_rows: int, dim: int, read_chunk: int = 65536,
                  memory_budget: int = MEMORY_BUDGET) -> dict[str, int]:
    """The concepts stage's dominant allocations (bytes) for a pool of `n_pool` crops among `n_rows`
    crop rows of dimension `dim`: the bound of the module docstring, term by term."""
    held = n_pool * dim * (4 if n_pool * dim * 4 <= memory_budget else 2)
    return {"held pool": held, "labels and distances": n_pool * 16, "kinds and assignment": n_rows * 5,
            "working chunk": read_chunk * (dim * 4 * 2 + 12)}


def _check_enough(n: int, k: int) -> None:
    if n < k:
        raise InputError(None, f"cannot make {k} clusters from {n} crops: lower concepts.k or "
                         f"add images / smaller crop fractions")


def kmeans(points: np.ndarray, k: int, *, iterations: int, seed: int,
           max_points_per_centroid: int, restarts: int = 1) -> faiss.Kmeans:
    """L2 k-means (FAISS), on the GPU when there is one."""
    _check_enough(len(points), k)
    model = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed, verbose=False,
                         gpu=faiss_uses_gpu(), max_points_per_centroid=max_points_per_centroid,
                         nredo=max(1, restarts), spherical=False)
    model.train(np.ascontiguousarray(points, dtype=np.float32))
    return model


# ----------------------------------------------------------------------------- bounded-memory k-means
def read_pool(store: zarr.Group, rows: np.ndarray, *, normalize: bool = False, chunk: int = 65536,
              memory_budget: int = MEMORY_BUDGET) -> np.ndarray:
    """The crop embeddings of `rows`, read chunk by chunk through read_rows (a damaged chunk is an
    InputError naming it): (len(rows), D) float32 when that fits `memory_budget` bytes, else
    float16 (half the memory; no float32 copy of the whole pool is ever made)."""
    dim = store["crops/embedding"].shape[1]
    dtype = np.float32 if len(rows) * dim * 4 <= memory_budget else np.float16
    out = np.empty((len(rows), dim), dtype=dtype)
    for start in range(0, len(rows), chunk):
        part = read_rows(store, "crops/embedding", rows[start:start + chunk])
        if normalize:
            part = _l2_normalise(part)
        out[start:start + len(part)] = part
        if dtype == np.float16 and not np.isfinite(out[start:start + len(part)]).all():
            raise InputError(None, f"crop embeddings of rows {rows[start]}..{rows[start + len(part) - 1]} exceed "
                             f"float16's range (65504), in which a pool larger than the memory budget is held: "
                             f"set concepts.normalize: true")
    return out


def _chunks(points: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 rows [start, start + chunk)) of `points`: views of a float32 array, or one
    reused float32 buffer of at most `chunk` rows for a float16 one (the consumer must not keep it)."""
    if points.dtype == np.float32:
        for start in range(0, len(points), chunk):
            yield start, points[start:start + chunk]
        return
    buffer = np.empty((min(chunk, len(points)), points.shape[1]), dtype=np.float32)
    for start in range(0, len(points), chunk):
        part = buffer[:len(points[start:start + chunk])]
        np.copyto(part, points[start:start + chunk])
        yield start, part


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> "faiss.StandardGpuResources":
    """One set of faiss GPU resources (cuBLAS handle, scratch memory) for the process: the
    bounded-memory k-means builds an index every iteration, and new resources each time would
    allocate them again (100 times in the paper settings)."""
    return faiss.StandardGpuResources()


def _flat_index(centroids: np.ndarray) -> faiss.Index:
    """Exact L2 index over the centroids, on the first GPU when faiss has one. K centroids
    searched by streamed chunks of crops: what bounds a pass is reading the crops, not the GPU."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if faiss_uses_gpu():
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


@dataclass
class _Pass:
    """One pass of crops against centroids: per-centroid float64 sums and counts, the sum of the
    squared distances (nan when the labels were given), and the labels if kept."""

    sums: np.ndarray
    counts: np.ndarray
    objective: float
    labels: np.ndarray | None


def _assign(chunks: Iterable[tuple[int, np.ndarray]], n: int, centroids: np.ndarray, *,
            keep_labels: bool = True, labels: np.ndarray | None = None) -> _Pass:
    """Assign n crops, streamed as (start, float32 chunk), to their nearest centroid (or take
    `labels`), accumulating each centroid's sum of members in float64."""
    k, dim = centroids.shape
    index = _flat_index(centroids) if labels is None else None
    sums, counts = np.zeros((k, dim)), np.zeros(k, dtype=np.int64)
    out = labels if labels is not None else (np.empty(n, dtype=np.int32) if keep_labels else None)
    objective = 0.0 if labels is None else float("nan")
    for start, x in chunks:
        if labels is None:
            dist, nearest = index.search(x, 1)
            lab = nearest[:, 0]
            objective += float(dist.sum(dtype=np.float64))
            if out is not None:
                out[start:start + len(x)] = lab
        else:
            lab = labels[start:start + len(x)]
        chunk_counts = np.bincount(lab, minlength=k)
        for j in np.flatnonzero(chunk_counts):
            sums[j] += x[lab == j].sum(axis=0, dtype=np.float64)
        counts += chunk_counts
    return _Pass(sums, counts, objective, out)


def _means(sums: np.ndarray, counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Mean of each centroid's members (float32); `fallback` for a centroid without any."""
    means = np.array(fallback, dtype=np.float32, copy=True)
    filled = counts > 0
    means[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return means


def _split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, n: int) -> int:
    """FAISS' rule for empty clusters (Clustering.cpp, split_clusters), in place: each empty
    centroid copies one picked with probability (size - 1) / (n - k) (RandomGenerator(1234),
    scanning from centroid 0), and the two are pushed apart by a +-1/1024 relative perturbation
    of alternate coordinates; the picked cluster's count is assumed halved."""
    hassign = counts.astype(np.float32)
    k = len(centroids)
    if not (hassign == 0).any():
        return 0
    rng = faiss.RandomGenerator(1234)
    up, down = np.float32(1 + 1 / 1024), np.float32(1 - 1 / 1024)
    split = 0
    for ci in np.flatnonzero(hassign == 0):
        cj = 0
        while True:
            p = np.float32((float(hassign[cj]) - 1.0) / float(np.float32(n - k)))
            if rng.rand_float() < p:
                break
            cj = (cj + 1) % k
        centroids[ci] = centroids[cj]
        centroids[ci, 0::2] *= up
        centroids[cj, 0::2] *= down
        centroids[ci, 1::2] *= down
        centroids[cj, 1::2] *= up
        hassign[ci] = hassign[cj] / np.float32(2)
        hassign[cj] -= hassign[ci]
        split += 1
    return split


def lloyd(points: np.ndarray, k: int, *, iterations: int, seed: int, restarts: int = 1,
          chunk: int = 65536) -> tuple[np.ndarray, list[float]]:
    """FAISS' k-means (faiss.Clustering without subsampling) with bounded memory.

    The same algorithm as faiss.Kmeans(max_points_per_centroid=len(points)): initial centroids
    are k distinct points drawn by faiss' own rand_perm(seed + 1 + restart * 15486557), each
    of `iterations` Lloyd steps assigns every point with an exact L2 search (faiss IndexFlatL2,
    GPU when faiss has one) and moves each centroid to the mean of its points, an empty
    cluster is re-seeded by FAISS' split rule, and of `restarts` runs the one with the lowest
    final objective is kept. The points (float32 or float16) are searched as float32 chunks of
    `chunk` rows, so the working memory is chunk x D x 4 bytes besides the points; centroid
    sums are accumulated in float64 (faiss sums in float32: the centroids agree to float32
    rounding).

    Returns:
        centroids (k, D) float32 and the objective (sum of squared distances) of each iteration's
        assignment, as faiss.Kmeans.obj.
    """
    n = len(points)
    _check_enough(n, k)
    if n == k:                                   # faiss: the points are the centroids, no iteration
        return points.astype(np.float32), []
    best, best_obj, best_objs = None, np.inf, []
    for restart in range(max(1, restarts)):
        perm = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
        faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1 + restart * 15486557)
        centroids = points[perm[:k]].astype(np.float32)
        del perm
        objs: list[float] = []
        for _ in range(iterations):
            step = _assign(_chunks(points, chunk), n, centroids, keep_labels=False)
            objs.append(step.objective)
            centroids = _means(step.sums, step.counts, np.zeros_like(centroids))
            _split_empty_clusters(centroids, step.counts, n)
        final = objs[-1] if objs else 0.0
        if best is None or final < best_obj:
            best, best_obj, best_objs = centroids, final, objs
    return best, best_objs


def _minibatch_model(k: int, iterations: int, seed: int, restarts: int, n: int):
    from sklearn.cluster import MiniBatchKMeans

    # The reference's call, MiniBatchKMeans(n_clusters=k, max_iter=niter, random_state=0), with
    # scikit-learn 1.0.1's defaults made explicit where later versions changed them (n_init 3
    # there, "auto" = 1 now: concepts.restarts, 3 in the Cityscapes and LIP settings).
    return MiniBatchKMeans(n_clusters=k, max_iter=iterations, random_state=seed, n_init=max(1, restarts),
                           batch_size=min(MINIBATCH_SIZE, n))


def minibatch_kmeans(points: np.ndarray, k: int, *, iterations: int, seed: int, restarts: int = 1,
                     max_no_improvement: int = 10) -> tuple[np.ndarray, np.ndarray | None, float]:
    """sklearn's MiniBatchKMeans, as the reference's train_kmeans (Cityscapes, LIP).

    float32 points (the pool fits the memory budget): one fit() call, the reference's. float16
    points: partial_fit over float32 minibatches gathered from them, so no float32 copy of the
    pool is made. That follows fit()'s loop with these differences: the initial centres are
    k-means++ on the first partial_fit's 3 x batch_size random points (one init, not the best
    of n_init, which partial_fit ignores) and that batch also makes one update step;
    minibatches are drawn (with replacement, as fit) by numpy's Generator(seed) rather than
    sklearn's RandomState; fit's early stop (the exponentially weighted mean of each
    minibatch's pre-update inertia has not improved for `max_no_improvement` steps) is
    reproduced here, since partial_fit has none; at most max_iter x n / batch_size steps.

    Returns:
        centres (k, D) float32, the labels of the points (fit: its labels_; None when streamed)
        and the objective (inertia; nan when streamed: the caller's final pass computes it).
    """
    n = len(points)
    _check_enough(n, k)
    model = _minibatch_model(k, iterations, seed, restarts, n)
    if points.dtype == np.float32:
        model.fit(points)
        return model.cluster_centers_.astype(np.float32), model.labels_.astype(np.int32), float(model.inertia_)
    model.set_params(compute_labels=False)
    rng = np.random.default_rng(seed)
    batch = model.batch_size

    def gather(size: int) -> np.ndarray:
        return points[np.sort(rng.integers(0, n, size))].astype(np.float32)

    model.partial_fit(gather(min(max(3 * batch, 3 * k), n)))
    ewa = ewa_min = None
    alpha = min(batch * 2.0 / (n + 1), 1.0)
    stale = 0
    for step in range(iterations * n // batch):
        x = gather(batch)
        centres = model.cluster_centers_
        dist = (x * x).sum(1, keepdims=True) - 2 * x @ centres.T + (centres * centres).sum(1)
        inertia = float(np.maximum(dist.min(axis=1), 0).sum()) / batch
        model.partial_fit(x)
        if step == 0:                            # fit() ignores the first step's inertia too
            continue
        ewa = inertia if ewa is None else ewa * (1 - alpha) + inertia * alpha
        if ewa_min is None or ewa < ewa_min:
            ewa_min, stale = ewa, 0
        else:
            stale += 1
            if stale >= max_no_improvement:
                break
    return model.cluster_centers_.astype(np.float32), None, float("nan")


def discover_concepts(store: zarr.Group, cfg: ConceptsConfig, *, read_chunk: int = 65536,
                      memory_budget: int = MEMORY_BUDGET) -> Concepts:
    """Cluster each pool of crops of `store` (a feature store) into cfg.k[pool] concepts.

    Args:
        store: an open feature store.
        cfg: k per pool, algorithm, iterations, restarts, seed, max_points_per_centroid (None:
            train on every crop), recompute_centroids, normalize.
        read_chunk: rows read from the store, and searched as one float32 chunk, at a time.
        memory_budget: bytes a float32 copy of a pool's training crops may take; a larger one is
            held as float16 and clustered streaming (module docstring: the memory bound).
    """
    empty = sorted(pool for pool, k in cfg.k.items() if not (isinstance(k, int) and k >= 1))
    if empty:
        raise InputError(None, f"concepts.k must give every pool at least 1 concept; got "
                               f"{', '.join(f'{p}: {cfg.k[p]!r}' for p in empty)}")
    unknown = sorted(set(cfg.k) - set(POOL_ORDER))
    if unknown:
        raise InputError(None, f"concepts.k has unknown pool(s) {unknown}; pools are {list(POOL_ORDER)}")
    kinds = read_rows(store, "crops/kind", absent_ok=True)      # 255 for images without crops: in no pool
    rng = np.random.default_rng(cfg.seed)
    centroids, pools, objective, trained_on = [], [], {}, {}
    assignment = np.full(len(kinds), -1, dtype=np.int32)
    offset = 0
    for pool in [p for p in POOL_ORDER if p in cfg.k]:
        k = int(cfg.k[pool])
        rows = pool_rows(kinds, pool)
        if len(rows) == 0:
            raise InputError(None, f"no '{pool}' crops in the feature store: features.pools must include "
                             f"'{pool}' (it has {sorted({k for k, v in CROP_KINDS.items() if v in set(kinds)})})")
        _check_enough(len(rows), k)
        if cfg.max_points_per_centroid is None:
            sample = rows                        # every crop, as the reference
        else:
            # Same subsample FAISS would draw, but drawn here so only those rows are read from disk.
            budget = k * cfg.max_points_per_centroid
            sample = np.sort(rng.choice(rows, size=min(budget, len(rows)), replace=False))
        points = read_pool(store, sample, normalize=cfg.normalize, chunk=read_chunk, memory_budget=memory_budget)
        labels = None
        if cfg.algorithm == "minibatch":
            trained, labels, objective[pool] = minibatch_kmeans(points, k, iterations=cfg.iterations,
                                                                seed=cfg.seed, restarts=cfg.restarts)
            how = "MiniBatchKMeans" + (" partial_fit, float16" if labels is None else "")
        elif points.dtype == np.float32:
            model = kmeans(points, k, iterations=cfg.iterations, seed=cfg.seed, restarts=cfg.restarts,
                           max_points_per_centroid=cfg.max_points_per_centroid or len(points))
            trained = model.centroids.copy()
            objective[pool] = float(model.obj[-1]) if len(model.obj) else float("nan")
            how = "faiss"
        else:
            trained, objs = lloyd(points, k, iterations=cfg.iterations, seed=cfg.seed,
                                  restarts=cfg.restarts, chunk=read_chunk)
            objective[pool] = objs[-1] if objs else float("nan")
            how = "faiss Lloyd streamed, float16"
        # Every crop of the pool to its nearest centroid: from the held points when they are the
        # whole pool, else streamed from the store.
        if len(sample) == len(rows):
            found = _assign(_chunks(points, read_chunk), len(rows), trained, labels=labels)
        else:
            del points
            found = _assign(_store_chunks(store, rows, cfg.normalize, read_chunk), len(rows), trained)
        if cfg.algorithm == "minibatch" and labels is None:
            objective[pool] = found.objective    # streamed MiniBatchKMeans: inertia of the final assignment
        assignment[rows] = found.labels + offset
        # The reference's last step: each centroid is the mean of its members (one without any,
        # which the reference would make NaN, keeps its k-means position).
        centroids.append(_means(found.sums, found.counts, trained) if cfg.recompute_centroids else trained)
        pools += [pool] * k
        trained_on[pool] = int(len(sample))
        log(f"concepts: pool '{pool}': {len(rows)} crops ({len(sample)} for training, {how}) -> {k} concepts, "
            f"objective {objective[pool]:.4g}{' (faiss GPU)' if faiss_uses_gpu() else ''}")
        offset += k
    all_centroids = np.concatenate(centroids).astype(np.float32)
    sizes = np.bincount(assignment[assignment >= 0], minlength=len(all_centroids))
    return Concepts(all_centroids, pools, sizes, assignment, objective, cfg.normalize, trained_on)


def _store_chunks(store: zarr.Group, rows: np.ndarray, normalize: bool, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(position, float32 embeddings) of `rows`, read from the store `chunk` rows at a time."""
    for start in range(0, len(rows), chunk):
        x = read_rows(store, "crops/embedding", rows[start:start + chunk])
        yield start, np.ascontiguousarray(_l2_normalise(x) if normalize else x, dtype=np.float32)


def concepts_meta(cfg: ConceptsConfig, store_attrs: dict) -> dict:
    """Provenance recorded beside the centroids."""
    return {"params": asdict(cfg), "backbone": store_attrs.get("backbone"),
            "weights_id": store_attrs.get("weights_id"), "seed": cfg.seed,
            "faiss_gpu": faiss_uses_gpu()}


def concepts_stage(config: Config) -> None:
    """Stage `concepts`: k-means over the crop embeddings of the feature store."""
    store = open_features_of(config)
    problem = faiss_install_problem()
    if problem:
        log(f"concepts: warning: {problem}")
    found = discover_concepts(store, config.concepts)
    found.save(config.path("concepts"), concepts_meta(config.concepts, dict(store.attrs)))
    log(f"concepts: {found.k} concepts, sizes {found.sizes.tolist()}")
