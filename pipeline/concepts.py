"""Concept discovery: FAISS k-means over the crop embeddings, one pool at a time.

The pools are the crop kinds of the feature store (thing, stuff, or all): each is
clustered into its own number of concepts and the centroids are concatenated in
pool order (things first, as in the paper's COCO setting). Training k-means follows
FAISS' own subsampling (`max_points_per_centroid` points per centroid); every crop is
then assigned, streamed from the store chunk by chunk.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import zarr

from pipeline.config import ConceptsConfig, Config
from pipeline.errors import InputError
from pipeline.files import atomic_write, commit, fingerprint, partial_path, remove, write_json
from pipeline.runtime import log
from pipeline.store import CROP_KINDS, check_provenance, open_features_of, read_rows

POOL_ORDER = ("thing", "stuff", "all")


def faiss_uses_gpu() -> bool:
    """True when this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


@dataclass
class Concepts:
    """Centroids (K, D) with the pool each came from, plus what made them."""

    centroids: np.ndarray
    pools: list[str]                       # pool name of each concept, (K,)
    sizes: np.ndarray                      # crops assigned to each concept, (K,)
    assignment: np.ndarray                 # concept of each crop row, -1 outside every pool, (M,)
    objective: dict = field(default_factory=dict)   # final k-means objective per pool
    normalize: bool = False

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
            "objective": self.objective, "normalize": self.normalize,
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
                       data["assignment"], meta.get("objective", {}), bool(meta.get("normalize", False)))


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pool_rows(kinds: np.ndarray, pool: str) -> np.ndarray:
    return np.flatnonzero(kinds == CROP_KINDS[pool])


def kmeans(points: np.ndarray, k: int, *, iterations: int, seed: int,
           max_points_per_centroid: int, restarts: int = 1) -> faiss.Kmeans:
    """L2 k-means (FAISS), on the GPU when there is one."""
    if len(points) < k:
        raise InputError(None, f"cannot make {k} clusters from {len(points)} crops: lower concepts.k or "
                         f"add images / smaller crop fractions")
    model = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed, verbose=False,
                         gpu=faiss_uses_gpu(), max_points_per_centroid=max_points_per_centroid,
                         nredo=max(1, restarts), spherical=False)
    model.train(np.ascontiguousarray(points, dtype=np.float32))
    return model


def discover_concepts(store: zarr.Group, cfg: ConceptsConfig, *, read_chunk: int = 65536) -> Concepts:
    """Cluster each pool of crops of `store` (a feature store) into cfg.k[pool] concepts."""
    unknown = sorted(set(cfg.k) - set(POOL_ORDER))
    if unknown:
        raise InputError(None, f"concepts.k has unknown pool(s) {unknown}; pools are {list(POOL_ORDER)}")
    kinds = read_rows(store, "crops/kind")
    rng = np.random.default_rng(cfg.seed)
    centroids, pools, objective = [], [], {}
    assignment = np.full(len(kinds), -1, dtype=np.int32)
    offset = 0
    for pool in [p for p in POOL_ORDER if p in cfg.k]:
        k = int(cfg.k[pool])
        rows = pool_rows(kinds, pool)
        if len(rows) == 0:
            raise InputError(None, f"no '{pool}' crops in the feature store: features.pools must include "
                             f"'{pool}' (it has {sorted({k for k, v in CROP_KINDS.items() if v in set(kinds)})})")
        # Same subsample FAISS would draw, but drawn here so only those rows are read from disk.
        budget = k * cfg.max_points_per_centroid
        sample = np.sort(rng.choice(rows, size=min(budget, len(rows)), replace=False))
        points = read_rows(store, "crops/embedding", sample)
        if cfg.normalize:
            points = _l2_normalise(points)
        model = kmeans(points, k, iterations=cfg.iterations, seed=cfg.seed,
                       max_points_per_centroid=cfg.max_points_per_centroid, restarts=cfg.restarts)
        objective[pool] = float(model.obj[-1]) if len(model.obj) else float("nan")
        for start in range(0, len(rows), read_chunk):
            chunk_rows = rows[start:start + read_chunk]
            chunk = read_rows(store, "crops/embedding", chunk_rows)
            if cfg.normalize:
                chunk = _l2_normalise(chunk)
            _, labels = model.index.search(np.ascontiguousarray(chunk, dtype=np.float32), 1)
            assignment[chunk_rows] = labels[:, 0] + offset
        centroids.append(model.centroids.copy())
        pools += [pool] * k
        log(f"concepts: pool '{pool}': {len(rows)} crops ({len(sample)} for training) -> {k} concepts, "
            f"objective {objective[pool]:.4g}{' (faiss GPU)' if faiss_uses_gpu() else ''}")
        offset += k
    all_centroids = np.concatenate(centroids).astype(np.float32)
    sizes = np.bincount(assignment[assignment >= 0], minlength=len(all_centroids))
    return Concepts(all_centroids, pools, sizes, assignment, objective, cfg.normalize)


def concepts_meta(cfg: ConceptsConfig, store_attrs: dict) -> dict:
    """Provenance recorded beside the centroids."""
    return {"params": asdict(cfg), "backbone": store_attrs.get("backbone"),
            "weights_id": store_attrs.get("weights_id"), "seed": cfg.seed,
            "faiss_gpu": faiss_uses_gpu()}


def concepts_stage(config: Config) -> None:
    """Stage `concepts`: k-means over the crop embeddings of the feature store."""
    store = open_features_of(config)
    found = discover_concepts(store, config.concepts)
    found.save(config.path("concepts"), concepts_meta(config.concepts, dict(store.attrs)))
    log(f"concepts: {found.k} concepts, sizes {found.sizes.tolist()}")
