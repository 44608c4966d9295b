"""`transfgu plan`: what a run will write and hold, before it runs.

For a setting (or params.yaml) and an image count, each artifact's bytes and file count and
each stage's peak memory, worked out by the code the stages themselves run: the feature store
and the pseudo-label file are created empty, by the stages' own functions, in a temporary
folder (their metadata, the shards each array will have), and the chunk bytes are added from
the array layout (`store.feature_arrays`): both stores are uncompressed, so that sum is what
the disk will hold. tests/test_plan.py checks it against a real run.

    transfgu plan --setting cocostuff27 --images 123287 --json
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.data import ImageRecord, Manifest

# Evaluation images of the published splits (method.md), the default of `--eval-images`.
EVAL_IMAGES = {"cocostuff27": 5000, "cocostuff171": 5000, "coco80": 5000, "cocostuff27_curated": 2175,
               "cityscapes27": 500, "voc21": 1449, "lip5": 10000, "lip16": 10000, "lip19": 10000}
# HDF5 indexes each chunked dataset's chunks with B-tree nodes of about 3,400 bytes holding about
# 56 chunks each (measured with h5py 3.16 on files written as write_pseudolabels writes them).
HDF5_BTREE_NODE_BYTES, HDF5_CHUNKS_PER_NODE = 3400, 56


@dataclass
class ArtifactPlan:
    name: str
    path: str
    bytes: int
    files: int


@dataclass
class StagePlan:
    name: str
    peak_ram_bytes: int
    terms: dict[str, int] = field(default_factory=dict)    # the dominant allocations, summed


def synthetic_manifest(config: Config, n_images: int, n_eval: int) -> Manifest:
    """A manifest of `n_images` images, the last `n_eval` of the evaluation split (all of it when it
    is the training split), at the training size, as the stages would be given."""
    h, w = config.image_size
    train, evaluation = config.data.train_split, config.data.eval_split
    n_eval = n_images if train == evaluation else n_eval
    records = [ImageRecord(f"{i:012d}", evaluation if i >= n_images - n_eval else train,
                           f"images/{i:012d}.jpg", f"labels/{i:012d}.png", h, w) for i in range(n_images)]
    return Manifest(config.data.dataset, [f"class{c}" for c in range(27)], records=records, root=config.data.root)


def _folder_bytes(path: Path) -> tuple[int, int]:
    total, files = 0, 0
    for folder, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(Path(folder) / name)
            files += 1
    return total, files


def plan_features(config: Config, manifest: Manifest, backbone, scratch: Path) -> ArtifactPlan:
    """features.zarr: metadata as create_feature_store writes it, plus every shard it will hold."""
    from pipeline.features import FeatureLayout, new_feature_store, store_attrs
    from pipeline.store import feature_arrays, image_members

    cfg = config.features
    layout = FeatureLayout.from_config(cfg, backbone)
    attrs = store_attrs(manifest, backbone, cfg, layout, crop_split=config.data.train_split,
                        eval_split=config.data.eval_split, weights_source=config.backbone.weights)
    root = new_feature_store(scratch / "features.zarr", manifest, cfg, layout, attrs)
    meta_bytes, meta_files = _folder_bytes(scratch / "features.zarr")
    members = image_members([r.split for r in manifest.records], attrs["eval_split"], attrs["crop_split"])
    specs = feature_arrays(layout.grid, layout.dim, len(layout.windows), int(root.attrs["samples_per_image"]))
    per_shard = cfg.chunk_images
    total, files = meta_bytes, meta_files
    for name, spec in specs.items():
        held = np.bincount(members[spec.images] // per_shard, minlength=math.ceil(len(manifest.records) / per_shard))
        for shard in root.attrs["shards"][name]:
            # zarr sharding: each image's chunk with its CRC32C, then an index of 16 bytes per chunk + CRC32C
            total += int(held[shard]) * (spec.row_bytes() + 4) + per_shard * 16 + 4
            files += 1
    return ArtifactPlan("features", str(config.path("features")), total, files)


def plan_pseudolabels(config: Config, manifest: Manifest, backbone, scratch: Path) -> ArtifactPlan:
    """pseudolabels.h5: the file create_pseudolabel_file makes, plus every image's chunks."""
    from pipeline.store import create_pseudolabel_file, flag_chunk_images

    h, w = (int(v) // backbone.patch_size for v in config.image_size)
    k = sum(int(v) for v in config.concepts.k.values()) + int(config.pseudolabels.background)
    path = scratch / "pseudolabels.h5"
    create_pseudolabel_file(path, image_ids=[r.id for r in manifest.records], num_concepts=k, grid=(h, w),
                            attrs={"params": asdict(config.pseudolabels)}, cam_dtype=config.pseudolabels.cam_dtype)
    n = len(manifest.records)
    label_bytes = 1 if k < 255 else 2
    # every chunk carries a 4-byte checksum (fletcher32); cam and label: a chunk per image;
    # cam_scale and done: chunks of flag_chunk_images(n) images, each allocated whole when first written
    per_image = n * (k * h * w * np.dtype(config.pseudolabels.cam_dtype).itemsize + h * w * label_bytes + 2 * 4)
    per_chunk = flag_chunk_images(n)
    blocks = math.ceil(n / per_chunk)
    flags = blocks * (per_chunk * (4 + 1) + 2 * 4)
    index = (2 * math.ceil(n / HDF5_CHUNKS_PER_NODE) + 2 * math.ceil(blocks / HDF5_CHUNKS_PER_NODE)) \
        * HDF5_BTREE_NODE_BYTES
    total = os.path.getsize(path) + per_image + flags + index
    return ArtifactPlan("pseudolabels", str(config.path("pseudolabels")), total, 1)


def plan_concepts(config: Config, n_crop_rows: int, dim: int) -> ArtifactPlan:
    """concepts/: the assignment of every crop row (int32) and the centroids (K, D) float32."""
    k = sum(int(v) for v in config.concepts.k.values())
    return ArtifactPlan("concepts", str(config.path("concepts")), n_crop_rows * 4 + k * dim * 4 + 4096, 2)


def plan_train_images(config: Config, manifest: Manifest) -> ArtifactPlan | None:
    """train_images.npy (train.image_cache): the training split decoded at the training size, uint8,
    with its .json stamp; None when training decodes the image files instead."""
    if not config.train.image_cache:
        return None
    h, w = (int(v) for v in (config.train.image_size or config.image_size))
    n = sum(r.split == config.data.train_split for r in manifest.records)
    return ArtifactPlan("train_images", str(config.path("train_images")), n * h * w * 3 + 128 + 256, 2)


def plan_manifest(config: Config, manifest: Manifest, scratch: Path) -> ArtifactPlan:
    path = scratch / "manifest.json"
    manifest.save(path)
    return ArtifactPlan("manifest", str(config.path("manifest")), os.path.getsize(path), 1)


def plan_stages(config: Config, manifest: Manifest, backbone) -> list[StagePlan]:
    """Peak memory of each stage: its dominant allocations (buffers, pools, batches), from the
    same layouts; add the backbone's own activations on the device."""
    from pipeline.concepts import memory_needed
    from pipeline.pseudolabels import BATCHES_PER_SHARD
    from pipeline.runtime import decode_threads
    from pipeline.features import FeatureLayout
    from pipeline.store import feature_arrays, image_members, samples_per_image

    cfg = config.features
    layout = FeatureLayout.from_config(cfg, backbone)
    members = image_members([r.split for r in manifest.records], config.data.eval_split, config.data.train_split)
    per_image = samples_per_image(cfg.bottom_up_samples, len(members["crops"]), layout.grid)
    specs = feature_arrays(layout.grid, layout.dim, len(layout.windows), per_image)
    batch, (hc, wc), crop = config.backbone.batch_size, layout.concept_size, cfg.crop_size
    ahead = decode_threads()
    h0, w0 = layout.image_size
    features = {"shard buffers": cfg.chunk_images * sum(s.row_bytes() for s in specs.values()),
                f"decoded batches ({ahead} ahead, this machine's cores)": (ahead + 1) * batch * (hc * wc + h0 * w0) * 3,
                "concept-scale batch": batch * 3 * hc * wc * 4,
                "crop batch": 4 * batch * 3 * crop * crop * 4}
    n_rows = len(members["crops"]) * len(layout.windows)
    concepts = memory_needed(n_pool=n_rows, n_rows=len(manifest.records) * len(layout.windows), dim=layout.dim)
    h, w = layout.grid
    k = sum(int(v) for v in config.concepts.k.values()) + int(config.pseudolabels.background)
    pb = config.pseudolabels.batch_size
    pseudolabels = {"CAMs and their gradients": 3 * pb * k * h * w * 4 + pb * k * h * w * layout.dim * 4,
                    f"decoded batches ({ahead} ahead)": (ahead + 1) * pb * h0 * w0 * 3,
                    "shard results": BATCHES_PER_SHARD * pb * k * h * w * 4}
    tb = config.train.batch_size
    train = {"batches in flight (2 per worker)": 2 * max(config.train.num_workers, 1) * tb *
             (layout.image_size[0] * layout.image_size[1] * 3 + k * h * w * 4)}
    n_samples = len(members["crops"]) * per_image
    evaluate = {"bottom-up k-means points": 2 * n_samples * layout.dim * 4}
    # What a stage's process holds before its buffers: python, torch, zarr, h5py, faiss and the
    # backbone, as this process holds them now (it imported the same and built the backbone).
    baseline = {"process baseline (python, torch, backbone)": _resident_bytes()}
    return [StagePlan(name, sum(terms.values()) + baseline[next(iter(baseline))], {**baseline, **terms})
            for name, terms in
            (("features", features), ("concepts", concepts), ("pseudolabels", pseudolabels),
             ("train", train), ("evaluate", evaluate))]


def _resident_bytes() -> int:
    """This process's peak resident memory so far (bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)        # macOS: bytes; Linux: KiB


def plan(config: Config, *, n_images: int | None = None, n_eval: int | None = None,
         manifest: Manifest | None = None) -> dict:
    """The plan of a run: {"setting", "images", "eval_images", "artifacts": [{"name", "path", "bytes",
    "files"}], "stages": [{"name", "peak_ram_bytes", "terms"}], "total_bytes", "total_files"}.

    Args:
        config: the run's parameters.
        n_images, n_eval: image count and how many are of the evaluation split (a synthetic
            manifest, synthetic_manifest()); or
        manifest: the real one (cache/manifest.json), which fixes both.
    """
    from pipeline.backbones import create_backbone

    if manifest is None:
        manifest = synthetic_manifest(config, int(n_images), int(n_eval or 0))
    # the architecture only (patch size, width, parameter count): no weights are read
    backbone = create_backbone(config.backbone.name, pretrained=False)
    with tempfile.TemporaryDirectory(prefix="transfgu-plan-") as scratch:
        scratch = Path(scratch)
        features = plan_features(config, manifest, backbone, scratch)
        from pipeline.features import FeatureLayout
        layout = FeatureLayout.from_config(config.features, backbone)
        artifacts = [plan_manifest(config, manifest, scratch), features,
                     plan_concepts(config, len(manifest.records) * len(layout.windows), layout.dim),
                     plan_pseudolabels(config, manifest, backbone, scratch)]
        artifacts += [a for a in [plan_train_images(config, manifest)] if a]
    stages = plan_stages(config, manifest, backbone)
    cache = config.cache_dir.resolve()
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    return {"setting": config.setting, "images": len(manifest.records),
            "disk_free_bytes": shutil.disk_usage(existing).free, "disk_folder": str(existing),
            "eval_images": sum(r.split == config.data.eval_split for r in manifest.records),
            "artifacts": [asdict(a) for a in artifacts], "stages": [asdict(s) for s in stages],
            "total_bytes": sum(a.bytes for a in artifacts), "total_files": sum(a.files for a in artifacts)}


def format_plan(result: dict) -> str:
    """The plan as a table for a terminal, in GB (10^9 bytes, as disks are sold)."""
    gb = 1e9
    source = f": {result['eval_images_source']}" if result.get("eval_images_source") else ""
    lines = [f"setting {result['setting']}: {result['images']:,} images ({result['eval_images']:,} evaluation{source})",
             f"{'artifact':<14}{'GB':>10}{'files':>10}  path"]
    for a in result["artifacts"]:
        lines.append(f"{a['name']:<14}{a['bytes'] / gb:>10.2f}{a['files']:>10,}  {a['path']}")
    lines.append(f"{'total':<14}{result['total_bytes'] / gb:>10.2f}{result['total_files']:>10,}")
    free = result["disk_free_bytes"]
    verdict = "fits" if result["total_bytes"] < free else "DOES NOT FIT: free space or move the cache"
    lines.append(f"{'disk free':<14}{free / gb:>10.2f}{'':>10}  {result['disk_folder']} ({verdict}; "
                 f"DVC hard-links its cache, .dvc/config, so it needs no second copy)")
    lines.append(f"{'stage':<14}{'peak GB':>10}  = process baseline + dominant buffers (activations of the backbone's "
                 f"forward come on top: on the GPU when there is one)")
    for s in result["stages"]:
        terms = ", ".join(f"{k} {v / gb:.2f}" for k, v in s["terms"].items())
        lines.append(f"{s['name']:<14}{s['peak_ram_bytes'] / gb:>10.2f}  {terms}")
    return "\n".join(lines)
