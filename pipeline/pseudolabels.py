"""Pseudo labels: one CAM per image per concept, materialised in HDF5.

Every image of the manifest (train and evaluation split: CAMs use no labels, and
the evaluation row `pseudo_labels` scores them) is resized to the training size,
and `pipeline.cam.compute_cams` gives its K concept maps at patch resolution. The
file is built at `<out>.partial` with a per-image `done` flag, flushed after every
batch, so an interrupted run resumes; it is renamed to `out` when complete.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.backbones import Backbone
from pipeline.cam import add_background_channel, cams_to_labels, compute_cams
from pipeline.concepts import Concepts
from pipeline.config import PseudoLabelsConfig
from pipeline.data import Manifest, images_to_tensor, load_image, resize_image
from pipeline.runtime import log, progress
from pipeline.store import (check_provenance, commit, create_pseudolabel_file, partial_path,
                            read_h5_attrs)


def image_batch(manifest: Manifest, indices: range | list[int], size: tuple[int, int]) -> torch.Tensor:
    """Images of `indices` resized to `size`, as (B, 3, H, W) float in [0, 1]."""
    arrays = [resize_image(load_image(manifest.resolve(manifest.records[i].image)), size) for i in indices]
    return images_to_tensor(arrays)


def concept_maps(backbone: Backbone, images: torch.Tensor, centroids: torch.Tensor,
                 cfg: PseudoLabelsConfig) -> torch.Tensor:
    """CAMs (B, K[+1], h, w) for images (B, 3, H, W); the background channel comes last."""
    cams = compute_cams(backbone, images, centroids, mass=cfg.mass)
    if cfg.background:
        cams = add_background_channel(cams, threshold=cfg.background_threshold)
    return cams


def write_pseudolabels(manifest: Manifest, backbone: Backbone, concepts: Concepts, cfg: PseudoLabelsConfig,
                       out: str | Path, *, image_size: tuple[int, int], device: torch.device,
                       provenance: dict, show_progress: bool = True) -> Path:
    """Build `out` (HDF5: cam, label, image_id) for every manifest image; resumable."""
    out = Path(out)
    h, w = image_size
    grid = (h // backbone.patch_size, w // backbone.patch_size)
    k = concepts.k + int(cfg.background)
    attrs = {**provenance, "params": asdict(cfg), "concepts_hash": concepts.fingerprint(),
             "num_concepts": k, "grid": list(grid), "image_size": [h, w],
             "concept_pools": concepts.pools + (["background"] if cfg.background else [])}
    partial = partial_path(out)
    ids = [r.id for r in manifest.records]
    if partial.exists():
        try:
            with h5py.File(partial, "r") as handle:
                check_provenance(partial, read_h5_attrs(handle), attrs)
                if handle["cam"].shape != (len(ids), k, *grid):
                    raise ValueError("shape changed")
        except Exception as exc:  # another configuration or a broken file: start over
            log(f"pseudolabels: not resuming {partial} ({str(exc).splitlines()[0]}); starting over")
            partial.unlink()
    if not partial.exists():
        create_pseudolabel_file(partial, image_ids=ids, num_concepts=k, grid=grid, attrs=attrs)

    backbone.to(device).eval()
    centroids = torch.from_numpy(concepts.centroids).float().to(device)
    tic, computed = time.perf_counter(), 0
    with h5py.File(partial, "r+") as handle:
        done = handle["done"][:]
        todo = np.flatnonzero(~done)
        with progress(total=len(ids), desc="pseudolabels", enabled=show_progress) as bar:
            bar.update(len(ids) - len(todo))
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size].tolist()
                images = image_batch(manifest, batch, image_size).to(device)
                cams = concept_maps(backbone, images, centroids, cfg)
                labels = cams_to_labels(cams)
                # h5py fancy indexing wants increasing indices; `todo` is sorted.
                handle["cam"][batch] = cams.float().cpu().numpy().astype(np.float16)
                handle["label"][batch] = labels.cpu().numpy().astype(handle["label"].dtype)
                handle["done"][batch] = True
                handle.flush()
                computed += len(batch)
                bar.update(len(batch))
    seconds = time.perf_counter() - tic
    log(f"pseudolabels: {computed} images x {k} concepts in {seconds:.1f} s "
        f"({computed / max(seconds, 1e-9):.2f} img/s"
        f"{f', {len(ids) - computed} resumed' if len(ids) - computed else ''}); grid {grid}")
    commit(partial, out)
    return out
