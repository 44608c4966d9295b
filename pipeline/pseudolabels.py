"""Pseudo labels: one CAM per image per concept, materialised in HDF5.

Every image of the manifest (train and evaluation split: CAMs use no labels, and
the evaluation row `pseudo_labels` scores them) is resized to the training size,
and `pipeline.cam.compute_cams` gives its K concept maps at patch resolution. The
file is built at `<out>.partial` with a per-image `done` flag, flushed after every
batch, so an interrupted run resumes; it is renamed to `out` when complete.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.backbones import Backbone, backbone_from_config
from pipeline.cam import add_background_channel, cams_to_labels, compute_cams
from pipeline.concepts import Concepts
from pipeline.compute import StageShards, run_shards, shard_inputs, shard_progress
from pipeline.config import BackboneConfig, ComputeConfig, Config, PseudoLabelsConfig
from pipeline.data import Manifest, stack_images, to_float_images
from pipeline.files import commit, partial_path, resume_or_restart
from pipeline.runtime import log, prefetched_batches
from pipeline.store import (check_provenance, create_pseudolabel_file, encode_cams, pseudolabel_provenance,
                            read_h5_attrs)


def concept_maps(backbone: Backbone, images: torch.Tensor, centroids: torch.Tensor,
                 cfg: PseudoLabelsConfig) -> torch.Tensor:
    """CAMs (B, K[+1], h, w) for images (B, 3, H, W); the background channel comes last."""
    frozen = torch.bfloat16 if cfg.frozen_bf16 and images.device.type == "cuda" else None
    cams = compute_cams(backbone, images, centroids, mass=cfg.mass, grad_scale=cfg.grad_scale, frozen_dtype=frozen)
    if cfg.background:
        cams = add_background_channel(cams, threshold=cfg.background_threshold)
    return cams


@dataclass(kw_only=True)
class CamShards(StageShards):
    """`work(rows)` of run_shards: the CAMs of a shard of manifest rows, as stored (encode_cams),
    with their hard labels. The client writes them (HDF5 has one writer)."""

    centroids: np.ndarray               # (K, D), pickled with the work
    cfg: PseudoLabelsConfig
    image_size: tuple[int, int]

    def __call__(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        manifest, backbone, device = self.inputs()
        centroids = torch.from_numpy(self.centroids).float().to(device)
        batches = [rows[i:i + self.cfg.batch_size] for i in range(0, len(rows), self.cfg.batch_size)]
        stored, scales, labels = [], [], []
        # the next batches are decoded while this one runs through the backbone
        # closing: an error's traceback (kept by dask) must not keep the pool's threads alive
        with contextlib.closing(prefetched_batches(batches, lambda i: manifest.image(i, self.image_size))) as loaded:
            for batch, images in zip(batches, loaded):
                # uint8 to the device: a quarter of float32's bytes
                cams = concept_maps(backbone, to_float_images(stack_images(images).to(device)), centroids, self.cfg)
                values, scale = encode_cams(cams.float().cpu().numpy(), self.cfg.cam_dtype)
                stored.append(values)
                scales.append(scale)
                labels.append(cams_to_labels(cams).cpu().numpy())
                shard_progress(len(batch))
        return np.concatenate(stored), np.concatenate(scales), np.concatenate(labels)


# A shard of pseudolabels: a task's work, and how often the file is flushed. Its first batch is
# decoded before any compute can start (make bench-stages): 16 batches keep that stall small.
BATCHES_PER_SHARD = 16


def write_pseudolabels(manifest: Manifest, backbone: Backbone, concepts: Concepts, cfg: PseudoLabelsConfig,
                       out: str | Path, *, image_size: tuple[int, int], device: torch.device | str,
                       provenance: dict, show_progress: bool = True, compute: ComputeConfig | None = None,
                       backbone_config: BackboneConfig | None = None) -> Path:
    """Build `out` (HDF5: cam, cam_scale, label, image_id) for every manifest image; resumable.

    Its attributes are `provenance` (e.g. dataset), the params and store.pseudolabel_provenance,
    which the readers check (store.open_pseudolabels_of). Shards of BATCHES_PER_SHARD batches run
    in this process or on a dask cluster (`compute`, with `backbone_config` to build the backbone
    there); this process writes each as it arrives and marks its images done. ``device`` ("auto",
    "cuda", a torch.device) is resolved where the shards run: here, or by each dask worker.
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
            handle["done"][:]       # a damaged flag chunk makes the partial unresumable, not a traceback

    if not resume_or_restart(partial, check, "pseudolabels", log):
        create_pseudolabel_file(partial, image_ids=ids, num_concepts=k, grid=grid, attrs=attrs,
                                cam_dtype=cfg.cam_dtype)

    work = CamShards(**shard_inputs(manifest, backbone, backbone_config, device, compute),
                     centroids=np.asarray(concepts.centroids, dtype=np.float32), cfg=cfg,
                     image_size=tuple(int(v) for v in image_size))
    tic = time.perf_counter()
    with h5py.File(partial, "r+") as handle:
        todo = np.flatnonzero(~handle["done"][:])
        per_shard = cfg.batch_size * BATCHES_PER_SHARD
        todo_shards = [todo[i:i + per_shard].tolist() for i in range(0, len(todo), per_shard)]

        def write(rows: list[int], result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            cams, scales, labels = result
            # h5py fancy indexing wants increasing indices; `todo` is sorted.
            handle["cam"][rows], handle["cam_scale"][rows] = cams, scales
            handle["label"][rows] = labels.astype(handle["label"].dtype)
            handle["done"][rows] = True
            handle.flush()

        run_shards(todo_shards, work, compute=compute, on_result=write, desc="pseudolabels",
                   total=len(ids), done=len(ids) - len(todo), show_progress=show_progress)
    computed = len(todo)
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
                       device=config.backbone.device, provenance=provenance,
                       compute=config.compute, backbone_config=config.backbone)
