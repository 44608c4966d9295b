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

from pipeline.backbones import Backbone, backbone_from_config
from pipeline.cam import add_background_channel, cams_to_labels, compute_cams
from pipeline.concepts import Concepts
from pipeline.config import Config, PseudoLabelsConfig
from pipeline.data import Manifest
from pipeline.files import commit, partial_path, resume_or_restart
from pipeline.runtime import log, prefetched, progress, resolve_device
from pipeline.store import (check_provenance, create_pseudolabel_file, encode_cams, pseudolabel_provenance,
                            read_h5_attrs)


def concept_maps(backbone: Backbone, images: torch.Tensor, centroids: torch.Tensor,
                 cfg: PseudoLabelsConfig) -> torch.Tensor:
    """CAMs (B, K[+1], h, w) for images (B, 3, H, W); the background channel comes last."""
    cams = compute_cams(backbone, images, centroids, mass=cfg.mass, grad_scale=cfg.grad_scale)
    if cfg.background:
        cams = add_background_channel(cams, threshold=cfg.background_threshold)
    return cams


def write_pseudolabels(manifest: Manifest, backbone: Backbone, concepts: Concepts, cfg: PseudoLabelsConfig,
                       out: str | Path, *, image_size: tuple[int, int], device: torch.device,
                       provenance: dict, show_progress: bool = True) -> Path:
    """Build `out` (HDF5: cam, label, image_id) for every manifest image; resumable.

    Its attributes are `provenance` (e.g. dataset), the params and store.pseudolabel_provenance,
    which the readers check (store.open_pseudolabels_of).
    """
    out = Path(out)
    ids = [r.id for r in manifest.records]
    identity = pseudolabel_provenance(backbone, concepts, ids, image_size=image_size, background=cfg.background)
    attrs = {**provenance, "params": asdict(cfg), **identity}
    k, grid = identity["num_concepts"], tuple(identity["grid"])
    partial = partial_path(out)

    def check(path: Path) -> None:
        with h5py.File(path, "r") as handle:
            check_provenance(path, read_h5_attrs(handle), attrs)
            if handle["cam"].shape != (len(ids), k, *grid):
                raise ValueError(f"cam shape {handle['cam'].shape} != {(len(ids), k, *grid)}")

    if not resume_or_restart(partial, check, "pseudolabels", log):
        create_pseudolabel_file(partial, image_ids=ids, num_concepts=k, grid=grid, attrs=attrs,
                                cam_dtype=cfg.cam_dtype)

    backbone.to(device).eval()
    centroids = torch.from_numpy(concepts.centroids).float().to(device)
    tic, computed = time.perf_counter(), 0
    with h5py.File(partial, "r+") as handle:
        done = handle["done"][:]
        todo = np.flatnonzero(~done)
        with progress(total=len(ids), desc="pseudolabels", enabled=show_progress) as bar:
            bar.update(len(ids) - len(todo))
            batches = [todo[start:start + cfg.batch_size].tolist() for start in range(0, len(todo), cfg.batch_size)]
            # the next batches are decoded while this one runs through the backbone
            for batch, loaded in zip(batches, prefetched(batches, lambda b: manifest.batch(b, image_size))):
                images = loaded.to(device)
                cams = concept_maps(backbone, images, centroids, cfg)
                labels = cams_to_labels(cams)
                # h5py fancy indexing wants increasing indices; `todo` is sorted.
                handle["cam"][batch], handle["cam_scale"][batch] = encode_cams(cams.float().cpu().numpy(),
                                                                                cfg.cam_dtype)
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


def pseudolabels_stage(config: Config) -> None:
    """Stage `pseudolabels`: the CAMs of every manifest image for every concept, into HDF5."""
    manifest = Manifest.load(config.path("manifest"))
    backbone = backbone_from_config(config.backbone)
    provenance = {"backbone": backbone.name, "weights_id": backbone.weights_id, "dataset": manifest.dataset}
    # Centroids of another backbone (or weights) would give CAMs of nothing: concepts.json
    # records those of the feature store the concepts came from.
    concepts = Concepts.load(config.path("concepts"), expected={k: provenance[k] for k in ("backbone", "weights_id")})
    write_pseudolabels(manifest, backbone, concepts, config.pseudolabels,
                       config.path("pseudolabels"), image_size=config.image_size,
                       device=resolve_device(config.backbone.device), provenance=provenance)
