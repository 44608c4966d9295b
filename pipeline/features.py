"""Frozen-backbone features: dense patch features, embeddings, saliency and crop embeddings.

For every image of the manifest, at the training size: patch features (h, w, D),
the global embedding (D,) and the saliency map (h, w) (the [CLS] attention for
ViTs). For every image of the concept split, the paper's crops: the image is
resized to `concept_scale` x the training size, square windows slide over it at
several side fractions, each window is classed thing / stuff by its share of
foreground, and the windows of the pools in use are resized to `crop_size` and
embedded. Images are streamed in batches and written chunk by chunk, so memory does
not grow with the dataset.

The foreground mask comes from the saliency of the training-size forward pass,
upsampled to the concept scale, rather than from a second forward pass at 2x: at
640x640 a ViT-S/8 pass costs four times the training-size one, and the thresholded
[CLS] attention is a coarse map either way.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torchvision.ops import roi_align

from pipeline.backbones import Backbone, backbone_from_config
from pipeline.compute import StageShards, run_shards, shard_inputs, shard_progress
from pipeline.config import BackboneConfig, ComputeConfig, Config, FeaturesConfig
from pipeline.errors import InputError
from pipeline.data import Manifest, resize_image, stack_images, to_float_images
from pipeline.files import commit, fingerprint, partial_path, resume_or_restart
from pipeline.runtime import autocast, log, prefetched_batches
from pipeline.store import (CROP_KINDS, ShardLog, check_provenance, create_feature_store, feature_arrays,
                            image_members, samples_per_image, shards)


# ----------------------------------------------------------------------------- windows
def window_positions(length: int, side: int, stride: int) -> list[int]:
    """Starts of windows of `side` every `stride` pixels, plus one flush with the far border
    when the regular grid leaves pixels uncovered (142 windows per 640x640 COCO image,
    306 per 640x1280 Cityscapes image, as in the paper)."""
    if side >= length:
        return [0]
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def sliding_windows(height: int, width: int, fractions: list[float], stride: float) -> np.ndarray:
    """Square windows (W, 4) as (y0, x0, y1, x1); side = fraction x the shorter image side."""
    boxes = []
    for fraction in fractions:
        side = max(1, int(round(fraction * min(height, width))))
        step = max(1, int(side * stride))
        for y0 in window_positions(height, side, step):
            for x0 in window_positions(width, side, step):
                boxes.append((y0, x0, y0 + side, x0 + side))
    return np.asarray(boxes, dtype=np.int32).reshape(-1, 4)


def reference_windows(height: int, width: int, patch: int, fractions: list[float]) -> np.ndarray:
    """The reference's windows (models/utils/bbox_anchors.py with the crop of cocostuff_crop.py),
    as (W, 4) (y0, x0, y1, x1) pixel boxes of a height x width image on a patch grid.

    On the grid of (gh, gw) = (height/patch, width/patch) cells, a window of fraction f has
    s = int(min(gh f, gw f)) and covers the cells within s/2 of its centre: s + 1 cells for an
    even s, so windows are 2-6% larger than f x the side. Centres lie on multiples of s/2
    (plus those flush with a border), scanned row by row. The pixel box spans its cells, less
    the last pixel (the reference slices [min:max] of the upsampled mask).
    """
    if height % patch or width % patch:
        raise InputError(None, f"reference windows need a concept size on the patch grid; got {height}x{width}, "
                               f"patch {patch}")
    gh, gw = height // patch, width // patch
    boxes = []
    for fraction in fractions:
        side = int(min(gh * fraction, gw * fraction))
        half = interval = side / 2
        for cy in range(gh):
            for cx in range(gw):
                if cx - half < 0 or cy - half < 0 or cx + half >= gw or cy + half >= gh:
                    continue
                on_x, on_y = cx % interval == 0, cy % interval == 0
                flush_x, flush_y = cx - half == 0 or cx + half == gw - 1, cy - half == 0 or cy + half == gh - 1
                if (on_x and on_y) or (on_y and flush_x) or (on_x and flush_y) or \
                        (cx + half == gw - 1 and cy + half == gh - 1):
                    y0, x0 = math.ceil(cy - half), math.ceil(cx - half)
                    y1, x1 = math.floor(cy + half), math.floor(cx + half)
                    boxes.append((y0 * patch, x0 * patch, (y1 + 1) * patch - 1, (x1 + 1) * patch - 1))
    if not boxes:
        raise InputError(None, f"no reference window fits a {height}x{width} image with fractions {fractions}")
    return np.asarray(boxes, dtype=np.int32).reshape(-1, 4)


def classify_windows(foreground: np.ndarray, boxes: np.ndarray, thing_fraction: float,
                     stuff_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Thing / stuff kind of each window from a boolean foreground mask (H, W).

    Returns (kind (W,) uint8 with CROP_KINDS codes, foreground share (W,)). An integral
    image gives every window's share in O(1).
    """
    integral = np.pad(foreground.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y0, x0, y1, x1 = boxes.T
    area = (y1 - y0) * (x1 - x0)
    share = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
    kind = np.zeros(len(boxes), dtype=np.uint8)
    kind[share > thing_fraction] = CROP_KINDS["thing"]
    kind[(1.0 - share) > stuff_fraction] = CROP_KINDS["stuff"]
    return kind, share


def foreground_mask(saliency: torch.Tensor, size: tuple[int, int], threshold_first: bool = False) -> torch.Tensor:
    """Saliency (B, h, w) -> bool foreground (B, H, W) at `size`, thresholded at each image's mean.

    threshold_first=False: upsample (bilinear), then threshold. True (the reference's, for
    saliency already at the concept scale): threshold on the patch grid, then nearest-upsample.
    """
    saliency = saliency.float()
    if threshold_first:
        mask = (saliency > saliency.mean(dim=(1, 2), keepdim=True)).float()
        return F.interpolate(mask[:, None], size=size, mode="nearest")[:, 0] > 0.5
    upsampled = F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return upsampled > upsampled.mean(dim=(1, 2), keepdim=True)


# ----------------------------------------------------------------------------- the job
@dataclass
class FeatureLayout:
    """Shapes the store is created with, derived once from the config and the backbone."""

    image_size: tuple[int, int]
    grid: tuple[int, int]
    concept_size: tuple[int, int]
    windows: np.ndarray          # (W, 4) in concept-scale pixels
    dim: int

    @classmethod
    def from_config(cls, cfg: FeaturesConfig, backbone: Backbone) -> "FeatureLayout":
        h, w = (int(v) for v in cfg.image_size)
        stride = backbone.patch_size
        if h % stride or w % stride:
            raise InputError(None, f"features.image_size {h}x{w} must be a multiple of the backbone's "
                             f"patch size {stride}")
        concept = (int(round(h * cfg.concept_scale)), int(round(w * cfg.concept_scale)))
        if (cfg.foreground == "concept_scale" or cfg.windows == "reference") and \
                (concept[0] % stride or concept[1] % stride):
            raise InputError(None, f"features.foreground concept_scale and features.windows reference work on the "
                                   f"patch grid of the concept size {concept[0]}x{concept[1]}, which must be a "
                                   f"multiple of the patch size {stride}")
        windows = reference_windows(*concept, stride, list(cfg.crop_fractions)) if cfg.windows == "reference" \
            else sliding_windows(*concept, list(cfg.crop_fractions), cfg.crop_stride)
        return cls((h, w), (h // stride, w // stride), concept, windows, backbone.embed_dim)


@torch.no_grad()
def embed_crops(backbone: Backbone, concept_images: torch.Tensor, boxes: torch.Tensor,
                owners: torch.Tensor, crop_size: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Embeddings (M, D) of M crops. boxes (M, 4) (y0, x0, y1, x1) index into concept_images
    (B, 3, Hc, Wc) through owners (M,). roi_align averages 2x2 samples per output pixel,
    which anti-aliases the downscaled large windows."""
    out = []
    for start in range(0, len(boxes), batch_size):
        sel = slice(start, start + batch_size)
        y0, x0, y1, x1 = boxes[sel].float().unbind(1)
        rois = torch.stack([owners[sel].float(), x0, y0, x1, y1], dim=1).to(device)
        crops = roi_align(concept_images, rois, output_size=crop_size, spatial_scale=1.0,
                          sampling_ratio=2, aligned=True)
        with autocast(device):
            out.append(backbone(crops).embedding.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)


def bottom_up_sample(patch: np.ndarray, image: int, count: int) -> np.ndarray:
    """`count` patch vectors (count, D) of one image's patch features (h, w, D), drawn without
    replacement with a generator seeded by the image's manifest index: the same sample whichever
    shard, worker or run computes the image."""
    flat = patch.reshape(-1, patch.shape[-1])
    return flat[np.random.default_rng(image).choice(len(flat), size=count, replace=False)]


def write_feature_shard(root: zarr.Group, manifest: Manifest, start: int, stop: int, *,
                        backbone: Backbone, cfg: FeaturesConfig, layout: FeatureLayout,
                        crop_split: str, eval_split: str, batch_size: int, device: torch.device,
                        on_batch: Callable[[int], None] | None = None) -> None:
    """Compute images [start, stop) (one shard of the store) and write each array's shard once.

    The shard is assembled in memory (at most shard x (h, w, D) float16 of patch features, when
    it holds evaluation images) and written in one go: a sharded array rewrites a whole shard
    file on every write, and one write per shard by its one writer is what lets independent
    tasks build one store.
    """
    arrays = feature_arrays(layout.grid, layout.dim, len(layout.windows), int(root.attrs["samples_per_image"]))
    splits = [manifest.records[i].split for i in range(start, stop)]
    holds = {"all": [True] * len(splits), "eval": [s == eval_split for s in splits],
             "crops": [s == crop_split for s in splits]}
    blocks = {name: np.full(spec.shape(stop - start), spec.fill_value, dtype=spec.dtype)
              for name, spec in arrays.items() if spec.rows_per_image and any(holds[spec.images])}
    pools = {CROP_KINDS[name] for name in cfg.pools}
    n_windows, n_samples = len(layout.windows), arrays["patch_sample"].rows_per_image
    starts = list(range(start, stop, batch_size))

    def load(i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image i resized to the training size and, when a crop-split image, to the concept
        size: on a prefetch thread, so that resizing overlaps compute too (on a GPU the main
        thread's resizes alone would bound the stage's rate)."""
        original = manifest.image(i)
        concept = resize_image(original, layout.concept_size) if holds["crops"][i - start] and n_windows else None
        return resize_image(original, layout.image_size), concept

    # the next batches are decoded and resized while this one runs through the backbone
    batches = [range(b0, min(b0 + batch_size, stop)) for b0 in starts]
    # closing: an error's traceback (kept by dask) must not keep the pool's threads alive
    with contextlib.closing(prefetched_batches(batches, load)) as loaded_batches:
        for b0, loaded in zip(starts, loaded_batches):
            # uint8 to the device: a quarter of float32's bytes
            images = stack_images([image for image, _ in loaded])
            crop_images = [concept for _, concept in loaded if concept is not None]
            concept = stack_images(crop_images) if crop_images else None
            b1 = min(b0 + batch_size, stop)
            local = slice(b0 - start, b1 - start)
            images = to_float_images(images.to(device))
            with torch.no_grad(), autocast(device):
                out = backbone(images)
            patch = out.patch.float().cpu().numpy().astype(np.float16)
            blocks["embedding"][local] = out.embedding.float().cpu().numpy()
            blocks["saliency"][local] = out.saliency.float().cpu().numpy().astype(np.float16)
            for j in range(b1 - b0):
                position = b0 - start + j
                if holds["eval"][position]:
                    blocks["patch"][position] = patch[j]
                if holds["crops"][position]:
                    blocks["patch_sample"][position * n_samples:(position + 1) * n_samples] = \
                        bottom_up_sample(patch[j], b0 + j, n_samples)

            with_crops = [j for j in range(b1 - b0) if holds["crops"][b0 - start + j]]
            if with_crops and n_windows:
                concept = to_float_images(concept.to(device))
                if cfg.foreground == "concept_scale":      # one more pass, at the scale the crops come from
                    with torch.no_grad(), autocast(device):
                        saliency = backbone(concept).saliency
                    fg = foreground_mask(saliency, layout.concept_size, threshold_first=True).cpu().numpy()
                else:
                    fg = foreground_mask(out.saliency[with_crops], layout.concept_size).cpu().numpy()
                kinds, owners, boxes = [], [], []
                for local_index, j in enumerate(with_crops):
                    kind, _ = classify_windows(fg[local_index], layout.windows, cfg.thing_fraction, cfg.stuff_fraction)
                    if "all" in cfg.pools:
                        kind = np.full_like(kind, CROP_KINDS["all"])
                    keep = np.isin(kind, list(pools))
                    kinds.append(np.where(keep, kind, CROP_KINDS["none"]).astype(np.uint8))
                    owners.append(np.full(int(keep.sum()), local_index))
                    boxes.append(layout.windows[keep])
                embeddings = embed_crops(backbone, concept, torch.from_numpy(np.concatenate(boxes)),
                                         torch.from_numpy(np.concatenate(owners)), cfg.crop_size,
                                         batch_size * 4, device).numpy()
                if np.abs(embeddings).max(initial=0) > np.finfo(np.float16).max:
                    raise InputError(None, f"crop embeddings of images {b0}..{b1 - 1} exceed float16's range "
                                           f"(65504), in which the feature store holds them: this backbone's "
                                           f"embeddings are not those of a normalised network")
                embeddings = embeddings.astype(np.float16)
                offset = 0
                for local_index, j in enumerate(with_crops):
                    rows = slice((b0 - start + j) * n_windows, (b0 - start + j + 1) * n_windows)
                    keep = kinds[local_index] != CROP_KINDS["none"]
                    block = np.zeros((n_windows, layout.dim), dtype=np.float16)   # windows of no pool: zeros
                    block[keep] = embeddings[offset:offset + keep.sum()]
                    offset += int(keep.sum())
                    blocks["crops/embedding"][rows] = block
                    blocks["crops/kind"][rows] = kinds[local_index]
            if on_batch is not None:
                on_batch(b1 - b0)
    for name, block in blocks.items():
        per = arrays[name].rows_per_image
        root[name][start * per:stop * per] = block


def store_attrs(manifest: Manifest, backbone: Backbone, cfg: FeaturesConfig, layout: FeatureLayout, *,
                crop_split: str, eval_split: str, weights_source: str = "") -> dict:
    """What a feature store records about how it was made; its readers check part of it."""
    return {
        "backbone": backbone.name,
        "weights_id": backbone.weights_id,
        "weights_source": weights_source,
        "image_size": list(layout.image_size),
        "grid": list(layout.grid),
        "concept_size": list(layout.concept_size),
        "windows": layout.windows.tolist(),      # crop row r is window r % W of image r // W
        "crop_split": crop_split,
        "eval_split": eval_split,
        "params": asdict(cfg),
        "dataset": manifest.dataset,
        "images_hash": fingerprint([r.id for r in manifest.records]),
        "n_images": len(manifest.records),
    }


def new_feature_store(path: str | Path, manifest: Manifest, cfg: FeaturesConfig, layout: FeatureLayout,
                      attrs: dict) -> zarr.Group:
    """The empty store of `manifest`'s images: its arrays, shards and the images each holds."""
    members = image_members([r.split for r in manifest.records], attrs["eval_split"], attrs["crop_split"])
    return create_feature_store(
        path, n_images=len(manifest.records), grid=layout.grid, dim=layout.dim,
        windows_per_image=len(layout.windows), members=members, shard_images=cfg.chunk_images,
        samples_per_image=samples_per_image(cfg.bottom_up_samples, len(members["crops"]), layout.grid),
        attrs=attrs)


@dataclass(kw_only=True)
class FeatureShards(StageShards):
    """`work(shard)` of run_shards: write_feature_shard for one shard of the partial store."""

    store: str
    cfg: FeaturesConfig
    crop_split: str
    eval_split: str
    batch_size: int

    def __call__(self, shard: tuple[int, int]) -> None:
        manifest, backbone, device = self.inputs()
        root = zarr.open_group(self.store, mode="r+")
        write_feature_shard(root, manifest, *shard, backbone=backbone, cfg=self.cfg,
                            layout=FeatureLayout.from_config(self.cfg, backbone), crop_split=self.crop_split,
                            eval_split=self.eval_split, batch_size=self.batch_size, device=device,
                            on_batch=shard_progress)


def extract_features(manifest: Manifest, backbone: Backbone, cfg: FeaturesConfig, out: str | Path, *,
                     crop_split: str, eval_split: str | None = None, batch_size: int, device: torch.device | str,
                     weights_source: str = "", show_progress: bool = True, compute: ComputeConfig | None = None,
                     backbone_config: BackboneConfig | None = None) -> Path:
    """Build `out` (a Zarr v3 store, store.feature_arrays) for every image of the manifest; resumable.

    The store is built at `<out>.partial`; each shard of `cfg.chunk_images` images is computed and
    written by one task (in this process, or on a dask cluster: `compute`) and logged when done,
    so a rerun after an interruption continues where it stopped (if it was made with the same
    backbone and params), and `out` appears only when complete.

    Args:
        crop_split: the split whose images give crops (and bottom-up samples).
        eval_split: the split whose patch features are stored; None: the crop split.
        compute: where the shards run (pipeline.compute); None: in this process.
        backbone_config: how workers build the backbone (needed by a dask scheduler, with
            `manifest.path`).
        device: what computes ("auto", "cuda", a torch.device), resolved where the shards run:
            in this process, or by each dask worker.
    """
    out = Path(out)
    layout = FeatureLayout.from_config(cfg, backbone)
    attrs = store_attrs(manifest, backbone, cfg, layout, crop_split=crop_split,
                        eval_split=crop_split if eval_split is None else eval_split, weights_source=weights_source)
    partial = partial_path(out)
    log_dir = ShardLog(partial.with_name(partial.name + ".shards"))
    if not resume_or_restart(partial, lambda p: check_provenance(p, dict(zarr.open_group(str(p), mode="r").attrs),
                                                                 attrs), "features", log):
        log_dir.clear()
        new_feature_store(partial, manifest, cfg, layout, attrs)
    todo = [(a, b) for a, b in shards(len(manifest.records), cfg.chunk_images) if not log_dir.done(a, b)]
    skipped = len(manifest.records) - sum(b - a for a, b in todo)
    work = FeatureShards(store=str(partial), **shard_inputs(manifest, backbone, backbone_config, device, compute),
                         cfg=cfg, crop_split=attrs["crop_split"], eval_split=attrs["eval_split"],
                         batch_size=batch_size)
    tic = time.perf_counter()
    run_shards(todo, work, compute=compute, on_result=lambda shard, _: log_dir.mark(*shard), desc="features",
               total=len(manifest.records), done=skipped, show_progress=show_progress)
    seconds = time.perf_counter() - tic
    done = len(manifest.records) - skipped
    n_crop_images = sum(r.split == crop_split for r in manifest.records)
    log(f"features: {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} img/s"
        f"{f', {skipped} resumed from a previous run' if skipped else ''}); "
        f"grid {layout.grid}, {len(layout.windows)} windows per image, {n_crop_images} images with crops")
    commit(partial, out)
    log_dir.clear()
    return out


def features_stage(config: Config) -> None:
    """Stage `features`: every manifest image through the frozen backbone into the Zarr store."""
    extract_features(Manifest.load(config.path("manifest")), backbone_from_config(config.backbone), config.features,
                     config.path("features"), crop_split=config.data.train_split, eval_split=config.data.eval_split,
                     batch_size=config.backbone.batch_size, device=config.backbone.device,
                     weights_source=config.backbone.weights, compute=config.compute, backbone_config=config.backbone)
