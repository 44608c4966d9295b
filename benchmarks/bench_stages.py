"""How much of each per-image stage's wall time is its compute: stage vs bare compute, same images.

    python benchmarks/bench_stages.py                   # efficientnet_lite0, the demo's sizes, 32 JPEGs
    python benchmarks/bench_stages.py --images 64 --repeats 3
    python benchmarks/bench_stages.py --backbone vit_small_patch8_224.dino --image-size 112 --images 16
    python benchmarks/bench_stages.py --device cuda --images 512 --batch-size 64 \\
        --backbone vit_small_patch8_224.dino --image-size 320      # on a GPU: images/s, share of bf16 peak

The images are COCO-like: ``--images`` 640x480 JPEGs (quality 90) of the synthetic scenes of
``pipeline.data.synthetic`` rendered at that size, with sensor noise so that they compress like
photographs, in a temporary folder, with a manifest of them (every fifth image in the
evaluation split, as the demo's 160/40). ``efficientnet_lite0`` has its offline ImageNet
weights; a ViT has random weights (``pretrained=False``: DINO's need a download) in the
paper's layout. Parameters are the ``demo`` setting's (``pipeline/settings.py``) with
``--image-size`` and ``--batch-size`` (backbone, pseudolabels and train batch) applied.

Per stage, on the same images in one run (best of ``--repeats``, stage and bare interleaved so
that load from other processes hits both alike; the stage once before as a warm-up), in a
process set up as the ``transfgu`` CLI sets up every stage (``OMP_WAIT_POLICY=PASSIVE``):

* ``features``: ``pipeline.features.extract_features`` into a real Zarr store in the temporary
  folder (store creation, shards, JPEG decoding and resizing, writes, commit), against the bare
  compute: the backbone forward at the training size and ``embed_crops`` of the same crops
  (the windows the stage keeps for each crop-split image), on tensors decoded and resized
  beforehand, with the same batch sizes.
* ``pseudolabels``: ``pipeline.pseudolabels.write_pseudolabels`` into a real HDF5 file, against
  ``concept_maps`` (``compute_cams`` and the background channel when set) on pre-decoded
  tensors, batch by batch. Centroids: K (``--concepts``) crop embeddings from the feature store
  just written.
* ``train``: ``pipeline.train.loop.train_segmenter`` (the stage's loop: its loader over the
  decoded image cache and the CAMs just written, hooks, checkpoints) per step, against
  ``train_step`` on batches already in memory. Skipped with the reason when the training
  code's entry points are not there as expected (it is being rewritten).
* ``loader_images_per_s_per_core`` from ``benchmarks/bench_loader.py`` when it exposes it.

Printed per stage: per-image times of the stage and of its bare compute, ``<stage>_efficiency``
= bare compute time / stage time (target >= 0.85), and where the stage's main thread spends
the rest (the last stage run, instrumented; decoding runs on the prefetch pool, so its time shows
as the wait for it). On CUDA also images/s and, for a ViT, the share of the GPU's bf16 peak
from the forward's FLOPs. Figures on a machine shared with other sessions are noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pipeline.cli  # noqa: F401,I001 - first, before torch: sets OMP_WAIT_POLICY as every stage runs with it
import h5py
import numpy as np
import torch
import zarr
from PIL import Image

import pipeline.features as features_mod
import pipeline.pseudolabels as pseudolabels_mod
from pipeline.backbones import Backbone, create_backbone
from pipeline.concepts import Concepts
from pipeline.config import FeaturesConfig, PseudoLabelsConfig, TrainConfig
from pipeline.data import Manifest, images_to_tensor, resize_image
from pipeline.data.images import load_image
from pipeline.data.manifest import ImageRecord
from pipeline.data.synthetic import Grid, render_scene
from pipeline.features import FeatureLayout, classify_windows, embed_crops, extract_features, foreground_mask
from pipeline.pseudolabels import concept_maps, write_pseudolabels
from pipeline.runtime import autocast, resolve_device
from pipeline.settings import SETTINGS
from pipeline.store import CROP_KINDS

TARGET = 0.85
# dense bf16 tensor-core peak (TFLOP/s) by device name; the share printed is of this figure
# (first match wins: the PCIe and NVL H100s before the SXM one)
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10": 125.0, "L4": 121.0}


# ----------------------------------------------------------------------------- inputs
def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 640x480 JPEGs (quality 90): synthetic scenes rendered at that size plus sensor
    noise (sigma 6), which puts their size near COCO's (~160 KB) so decoding costs what it does there."""
    rng = np.random.default_rng(seed)
    grid = Grid.of((480, 640))
    paths = []
    for i in range(count):
        image, _ = render_scene(rng, grid)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def bench_manifest(paths: list[Path], path: Path) -> Manifest:
    """The JPEGs as a saved manifest: every fifth image in `val`, the rest `train` (the demo's
    160/40); saved so that the stages' work objects have the path they record."""
    records = [ImageRecord(p.stem, "val" if i % 5 == 4 else "train", str(p), None, 480, 640)
               for i, p in enumerate(paths)]
    manifest = Manifest("bench", ["a", "b"], records=records, root=str(path.parent))
    manifest.save(path)
    return Manifest.load(path)


def best_of(run: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of ``run()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return min(times), float(np.median(times))


def alternate(stage: Callable[[], Any], bare: Callable[[], Any], repeats: int,
              instrument: Callable[[], contextlib.AbstractContextManager] | None = None,
              warm_up: bool = True) -> tuple[list[float], list[float]]:
    """Wall seconds of ``repeats`` runs each of ``stage`` and ``bare``, alternating so that load
    from other processes hits both alike; ``stage`` once before, untimed (``warm_up``); the last
    stage run under ``instrument()`` (its wrappers cost microseconds per call)."""
    if warm_up:
        stage()
    stage_times, bare_times = [], []
    for r in range(repeats):
        with instrument() if instrument and r == repeats - 1 else contextlib.nullcontext():
            stage_times.append(best_of(stage, 1)[0])
        bare_times.append(best_of(bare, 1)[0])
    return stage_times, bare_times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- breakdown
class Breakdown:
    """Exclusive wall time of wrapped calls on the calling (main) thread, by label: a call
    inside another wrapped call counts for the inner label only. Calls from other threads
    (the prefetch pool) pass through untimed."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.main = threading.get_ident()

    def wrap(self, label: str, fn: Callable, outer_only: bool = False) -> Callable:
        """``outer_only``: inside another wrapped call, the time stays with that call's label
        (the backbone's forwards inside embed_crops are embed_crops')."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self.main or (outer_only and self.stack):
                return fn(*args, **kwargs)
            now = time.perf_counter()
            if self.stack:
                self.totals[self.stack[-1][0]] += now - self.stack[-1][1]
            self.stack.append([label, now])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                name, start = self.stack.pop()
                self.totals[name] += end - start
                if self.stack:
                    self.stack[-1][1] = end
        return timed

    def prefetched(self, original: Callable) -> Callable:
        """runtime.prefetched_batches whose every next() (the wait for the prefetch pool) is timed."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            source = original(*args, **kwargs)
            step = self.wrap("wait for decoding (prefetch pool)", lambda: next(source, _DONE))
            while (item := step()) is not _DONE:
                yield item
        return wrapper

    def report(self, total: float, n: int, indent: str = "    ") -> None:
        rest = total - sum(self.totals.values())
        for label, seconds in sorted([*self.totals.items(), ("other (loop, numpy, bookkeeping)", rest)],
                                     key=lambda kv: -kv[1]):
            print(f"{indent}{label:44s} {1e3 * seconds / n:8.2f} ms/img  {100 * seconds / total:5.1f}%")


_DONE = object()


def instrumented(breakdown: Breakdown, module: Any, backbone: Backbone, names: dict[str, str]) -> contextlib.ExitStack:
    """Patches for one instrumented stage run: ``names`` (attribute of ``module`` -> label), the
    backbone's forward, zarr and HDF5 writes, and the prefetch wait."""
    stack = contextlib.ExitStack()
    for attr, label in names.items():
        stack.enter_context(mock.patch.object(module, attr, breakdown.wrap(label, getattr(module, attr))))
    stack.enter_context(mock.patch.object(module, "prefetched_batches",
                                          breakdown.prefetched(module.prefetched_batches)))
    stack.enter_context(mock.patch.object(backbone, "forward", breakdown.wrap("backbone forward", backbone.forward,
                                                                                   outer_only=True)))
    stack.enter_context(mock.patch.object(zarr.Array, "__setitem__",
                                          breakdown.wrap("zarr writes (one per shard)", zarr.Array.__setitem__)))
    stack.enter_context(mock.patch.object(h5py.Dataset, "__setitem__",
                                          breakdown.wrap("HDF5 writes", h5py.Dataset.__setitem__)))
    stack.enter_context(mock.patch.object(h5py.File, "flush", breakdown.wrap("HDF5 flush", h5py.File.flush)))
    return stack


# ----------------------------------------------------------------------------- features
def crop_plan(backbone: Backbone, tensors: torch.Tensor, manifest: Manifest, cfg: FeaturesConfig,
              layout: FeatureLayout, batch_size: int, device: torch.device) -> list[tuple]:
    """Per batch, the crops the stage embeds: (owners, boxes) of the windows kept for the
    crop-split images, classed from the training-size saliency as write_feature_shard classes
    them (features.foreground "upsampled"; the stage's other choice adds a pass this skips)."""
    pools = {CROP_KINDS[name] for name in cfg.pools}
    plan = []
    for b0 in range(0, len(tensors), batch_size):
        with torch.no_grad(), autocast(device):
            saliency = backbone(tensors[b0:b0 + batch_size].to(device)).saliency
        with_crops = [j for j in range(len(saliency)) if manifest.records[b0 + j].split == "train"]
        owners, boxes = [], []
        if with_crops:
            fg = foreground_mask(saliency[with_crops], layout.concept_size).cpu().numpy()
            for local, _ in enumerate(with_crops):
                kind, _ = classify_windows(fg[local], layout.windows, cfg.thing_fraction, cfg.stuff_fraction)
                if "all" in cfg.pools:
                    kind = np.full_like(kind, CROP_KINDS["all"])
                keep = np.isin(kind, list(pools))
                owners.append(np.full(int(keep.sum()), local))
                boxes.append(layout.windows[keep])
        plan.append((with_crops, torch.from_numpy(np.concatenate(owners)) if owners else None,
                     torch.from_numpy(np.concatenate(boxes)) if boxes else None))
    return plan


def bench_features(manifest: Manifest, backbone: Backbone, cfg: FeaturesConfig, batch_size: int,
                   device: torch.device, folder: Path, repeats: int) -> dict:
    layout = FeatureLayout.from_config(cfg, backbone)
    n = len(manifest.records)
    originals = [manifest.image(i) for i in range(n)]
    # the bare compute's inputs: decoded and resized once, outside the timing
    small = images_to_tensor([resize_image(img, layout.image_size) for img in originals])
    concept = images_to_tensor([resize_image(img, layout.concept_size) for img in originals])
    plan = crop_plan(backbone, small, manifest, cfg, layout, batch_size, device)
    crops = sum(len(owners) for _, owners, _ in plan if owners is not None)
    small, concept = small.to(device), concept.to(device)

    def bare() -> None:
        for (with_crops, owners, boxes), b0 in zip(plan, range(0, n, batch_size)):
            with torch.no_grad(), autocast(device):
                out = backbone(small[b0:b0 + batch_size])
            out.patch.float().cpu()        # the stage takes every output to the host; so does this
            if with_crops and owners is not None and len(owners):
                embed_crops(backbone, concept[[b0 + j for j in with_crops]], boxes, owners, cfg.crop_size,
                            batch_size * 4, device)
        sync(device)

    runs = iter(range(1_000_000))

    def stage() -> None:
        extract_features(manifest, backbone, cfg, folder / f"features_{next(runs)}.zarr", crop_split="train",
                         eval_split="val", batch_size=batch_size, device=device, show_progress=False)
        sync(device)

    # the stage once first (imports, zarr codecs, the page cache, oneDNN's kernels for every shape
    # the bare run uses too); then stage and bare alternate, the last stage run instrumented
    breakdown = Breakdown()
    instrument = partial(instrumented, breakdown, features_mod, backbone, {
                "resize_image": "resize (prefetch thread)", "stack_images": "stack_images",
                "to_float_images": "to_float_images (device)",
                "embed_crops": "embed_crops (crop forwards)", "bottom_up_sample": "bottom_up_sample",
                "classify_windows": "classify_windows", "foreground_mask": "foreground_mask",
                "new_feature_store": "store creation", "commit": "commit (rename)"})
    with contextlib.redirect_stderr(io.StringIO()):       # the stage's summary line
        stage_times, bare_times = alternate(stage, bare, repeats, instrument)
    return {"stage": stage_times, "bare": bare_times, "breakdown": breakdown, "breakdown_total": stage_times[-1],
            "crops": crops, "layout": layout, "store": folder / "features_0.zarr"}


# ----------------------------------------------------------------------------- pseudolabels
def bench_pseudolabels(manifest: Manifest, backbone: Backbone, cfg: PseudoLabelsConfig, concepts: Concepts,
                       image_size: tuple[int, int], device: torch.device, folder: Path, repeats: int) -> dict:
    n = len(manifest.records)
    tensors = manifest.batch(range(n), image_size).to(device)
    centroids = torch.from_numpy(concepts.centroids).float().to(device)
    provenance = {"backbone": backbone.name, "weights_id": backbone.weights_id, "dataset": manifest.dataset}

    def bare() -> None:
        for b0 in range(0, n, cfg.batch_size):
            concept_maps(backbone, tensors[b0:b0 + cfg.batch_size], centroids, cfg).cpu()
        sync(device)

    runs = iter(range(1_000_000))

    def stage() -> None:
        write_pseudolabels(manifest, backbone, concepts, cfg, folder / f"pseudolabels_{next(runs)}.h5",
                           image_size=image_size, device=device, provenance=provenance, show_progress=False)
        sync(device)

    breakdown = Breakdown()
    instrument = partial(instrumented, breakdown, pseudolabels_mod, backbone, {
                "concept_maps": "concept_maps (CAM forward + gradient)", "encode_cams": "encode_cams",
                "cams_to_labels": "cams_to_labels", "create_pseudolabel_file": "HDF5 file creation",
                "commit": "commit (rename)"})
    with contextlib.redirect_stderr(io.StringIO()):
        stage_times, bare_times = alternate(stage, bare, repeats, instrument)
    return {"stage": stage_times, "bare": bare_times, "breakdown": breakdown, "breakdown_total": stage_times[-1],
            "file": folder / "pseudolabels_0.h5"}


# ----------------------------------------------------------------------------- train
def bench_train(manifest: Manifest, backbone: Backbone, labels: Path, image_size: tuple[int, int],
                batch_size: int, workers: int, epochs: int, device: torch.device, folder: Path,
                repeats: int) -> dict:
    """train_segmenter's seconds per step against train_step's on batches in memory; raises
    ImportError / TypeError / AttributeError when the training code's interface has moved."""
    from pipeline.store import CamReader
    from pipeline.train.data import PseudoLabelDataset, build_image_cache
    from pipeline.train.loop import steps_per_epoch, train_segmenter, train_step
    from pipeline.train.state import TrainState

    params = SETTINGS.get("demo").params()["train"]
    n = len(manifest.records)
    # `repeat` passes per epoch so that an epoch has the demo's 10 steps (160 images / 16): the
    # loop's per-epoch work (checkpoint, log) weighs on a step as it does in the stage
    repeat = max(1, -(-10 * batch_size // n))
    config = replace(TrainConfig(**params), batch_size=batch_size, num_workers=workers, epochs=epochs,
                     device=str(device), bootstrap=False, repeat=repeat)
    indices = list(range(n))
    with h5py.File(labels, "r") as handle:
        k = int(handle["cam"].shape[1])
    cache = build_image_cache(folder / "train_images.npy", lambda p: manifest.image(p, image_size), n, image_size,
                              {"bench": n}, workers=1, log=lambda _: None)
    cams_reader = CamReader(labels, indices)
    steps = steps_per_epoch(n, config)
    # the bare step's inputs: batches as the loop collates them (uint8 images, stored CAMs), in memory
    order = [i % n for i in range(steps * batch_size)]
    batches = [(torch.from_numpy(np.stack([cache(i) for i in order[s * batch_size:(s + 1) * batch_size]])),
                torch.from_numpy(np.stack([cams_reader(i) for i in order[s * batch_size:(s + 1) * batch_size]])))
               for s in range(steps)]
    state = TrainState.create(backbone.embed_dim, k, config, device)
    generator = torch.Generator().manual_seed(0)

    def bare() -> None:
        for _ in range(epochs):
            for images, cams in batches:
                train_step(backbone, state, images, cams, None, 0.0, generator, device)
        sync(device)

    runs = iter(range(1_000_000))

    def loop() -> None:
        dataset = PseudoLabelDataset(cache, CamReader(labels, indices), n)
        train_segmenter(backbone, dataset, k, config, folder / f"model_{next(runs)}", progress=False,
                        log_fn=lambda _: None)
        sync(device)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_step(backbone, state, *batches[0], None, 0.0, generator, device)     # warm-up: one step
        loop_times, bare_times = alternate(loop, bare, repeats, warm_up=False)
    return {"stage": loop_times, "bare": bare_times, "steps": steps * epochs, "k": k, "config": config}


# ----------------------------------------------------------------------------- loader
def loader_rate(images: int) -> tuple[float | None, str]:
    """loader_images_per_s_per_core from benchmarks/bench_loader.py: a function returning it
    when the module has one, else its main() with a small run, its output parsed."""
    path = Path(__file__).with_name("bench_loader.py")
    if not path.exists():
        return None, "benchmarks/bench_loader.py is absent"
    sys.path.insert(0, str(path.parent))
    threads = torch.get_num_threads()
    try:
        import bench_loader
        for name in ("loader_images_per_s_per_core", "loader_rate", "measure"):
            fn = getattr(bench_loader, name, None)
            if callable(fn):
                return float(fn()), f"bench_loader.{name}()"
        if not callable(getattr(bench_loader, "main", None)):
            return None, "benchmarks/bench_loader.py exposes no function giving the rate"
        out = io.StringIO()
        argv = ["bench_loader.py", "--images", str(images), "--repeats", "2"]
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out):
            bench_loader.main()
        found = re.search(r"^loader_images_per_s_per_core=([\d.]+)", out.getvalue(), re.M)
        if not found:
            return None, "bench_loader.main() printed no loader_images_per_s_per_core line"
        return float(found.group(1)), f"bench_loader.main() with {' '.join(argv[1:])} (its defaults otherwise)"
    except Exception as err:     # noqa: BLE001 - someone else's benchmark: report, do not fail this one
        return None, f"bench_loader failed: {type(err).__name__}: {err}"
    finally:
        torch.set_num_threads(threads)     # bench_loader pins one thread
        sys.path.remove(str(path.parent))


# ----------------------------------------------------------------------------- GPU figures
def vit_forward_flops(backbone: Backbone, size: tuple[int, int]) -> float:
    """Multiply-add FLOPs (x2) of one ViT forward at ``size``: per block the qkv, projection
    and MLP matmuls over T tokens and the two T x T attention products."""
    vit = backbone.vit
    d = backbone.embed_dim
    h, w = backbone.grid(*size)
    t = h * w + 1
    mlp = vit.blocks[0].mlp.fc1.out_features
    per_block = 2 * t * d * (3 * d + d + 2 * mlp) + 2 * 2 * t * t * d
    patchify = 2 * h * w * (3 * backbone.patch_size ** 2) * d
    return len(vit.blocks) * per_block + patchify


def bf16_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------- main
def show(name: str, result: dict, n: int, unit: str = "img") -> float:
    stage, bare = min(result["stage"]), min(result["bare"])
    ratio = bare / stage
    print(f"  stage {1e3 * stage / n:8.2f} ms/{unit} (median {1e3 * np.median(result['stage']) / n:.2f})   "
          f"bare compute {1e3 * bare / n:8.2f} ms/{unit} (median {1e3 * np.median(result['bare']) / n:.2f})   "
          f"outside compute {1e3 * (stage - bare) / n:7.2f} ms/{unit}")
    if "breakdown" in result:
        print(f"  where the stage's main thread went (the last stage run, instrumented: "
              f"{1e3 * result['breakdown_total'] / n:.2f} ms/img):")
        result["breakdown"].report(result["breakdown_total"], n)
    note = f"   (below the {TARGET} target)" if ratio < TARGET else \
        "   (above 1: the bare runs met more load from other processes than the stage's)" if ratio > 1.02 else ""
    print(f"{name}_efficiency={ratio:.3f}{note}")
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="640x480 JPEGs (a fifth in the evaluation split)")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="efficientnet_lite0 (offline weights) or a ViT name (random weights)")
    parser.add_argument("--image-size", type=int, default=None, help="training size (square); default: the demo's 224")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the demo's 16")
    parser.add_argument("--crop-size", type=int, default=None, help="default: the demo's 96")
    parser.add_argument("--concepts", type=int, default=7, help="K (the demo: 3 thing + 4 stuff)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--stages", default="features,pseudolabels,train,loader")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--train-workers", type=int, default=0,
                        help="the training loop's loader workers (0: on 2 cores workers take the step's cores)")
    args = parser.parse_args(argv)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    demo = SETTINGS.get("demo").params()
    size = args.image_size or int(demo["features"]["image_size"][0])
    batch = args.batch_size or int(demo["backbone"]["batch_size"])
    fcfg = FeaturesConfig(**{**demo["features"], "image_size": [size, size],
                             "crop_size": args.crop_size or demo["features"]["crop_size"]})
    pcfg = PseudoLabelsConfig(**{**demo["pseudolabels"], "batch_size": batch})
    vit = args.backbone != "efficientnet_lite0"
    backbone = create_backbone(args.backbone, pretrained=not vit).to(device).eval()
    ratios: dict[str, float | None] = {}

    with tempfile.TemporaryDirectory(prefix="bench_stages_") as tmp:
        folder = Path(tmp)
        tic = time.perf_counter()
        paths = write_jpegs(folder, args.images)
        manifest = bench_manifest(paths, folder / "manifest.json")
        kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
        tic = time.perf_counter()
        for i in range(len(paths)):
            load_image(paths[i])
        decode_ms = 1e3 * (time.perf_counter() - tic) / len(paths)
        tic = time.perf_counter()
        img = load_image(paths[0])
        for _ in range(10):
            resize_image(img, (size, size))
        resize_ms = 1e3 * (time.perf_counter() - tic) / 10
        print(f"{args.images} JPEGs 640x480 (mean {kb:.0f} KB, q90; {sum(r.split == 'train' for r in manifest.records)}"
              f" train with crops, the rest val); backbone {backbone.name} "
              f"({'random weights' if vit else 'offline weights'}), image {size}x{size}, batch {batch}, "
              f"crop {fcfg.crop_size}, K={args.concepts}; device {device}"
              f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
              f"torch threads {torch.get_num_threads()} on {os.cpu_count()} CPUs; best of {args.repeats}")
        print(f"serial costs per image on this thread: decode {decode_ms:.2f} ms, resize to {size}x{size} "
              f"{resize_ms:.2f} ms")
        print("NOTE: timed on a machine shared with other sessions: figures under load are noisy "
              "(stage and bare runs are interleaved so that load hits both alike)")
        n = len(manifest.records)

        feats = None
        if "features" in stages:
            print("[features] extract_features -> Zarr vs backbone forward + embed_crops on decoded tensors")
            feats = bench_features(manifest, backbone, fcfg, batch, device, folder, args.repeats)
            print(f"  {feats['layout'].grid} grid, {len(feats['layout'].windows)} windows per image, "
                  f"{feats['crops']} crops embedded in all")
            ratios["features"] = show("features", feats, n)
            if device.type == "cuda":
                print(f"  features_images_per_s={n / min(feats['stage']):.1f} "
                      f"(bare {n / min(feats['bare']):.1f})")

        labels = None
        if stages & {"pseudolabels", "train"}:
            if feats is not None:        # K crop embeddings of the store just written
                store = zarr.open_group(str(feats["store"]), mode="r")
                points = np.asarray(store["crops/embedding"][:], dtype=np.float32)
                points = points[np.abs(points).sum(1) > 0]
            else:                        # --stages without features: image embeddings
                with torch.no_grad():
                    points = backbone(manifest.batch(range(min(n, 4 * args.concepts)), (size, size)).to(device)
                                      ).embedding.float().cpu().numpy()
            rows = np.random.default_rng(0).choice(len(points), size=args.concepts, replace=False)
            concepts = Concepts(points[rows], ["thing"] * args.concepts, np.ones(args.concepts, dtype=np.int64),
                                np.full(len(points), -1))
            print("[pseudolabels] write_pseudolabels -> HDF5 vs concept_maps on decoded tensors")
            pl = bench_pseudolabels(manifest, backbone, pcfg, concepts, (size, size), device, folder, args.repeats)
            ratios["pseudolabels"] = show("pseudolabels", pl, n)
            labels = pl["file"]
            if device.type == "cuda":
                print(f"  pseudolabels_images_per_s={n / min(pl['stage']):.1f} (bare {n / min(pl['bare']):.1f})")

        if "train" in stages:
            print("[train] train_segmenter per step vs train_step on batches in memory")
            if n < batch:
                print(f"train_efficiency=skipped (fewer images than a batch: {n} < {batch})")
            else:
                try:
                    tr = bench_train(manifest, backbone, labels, (size, size), batch, args.train_workers,
                                     args.train_epochs, device, folder, args.repeats)
                except (ImportError, AttributeError, TypeError) as err:
                    print(f"train_efficiency=skipped (the training code's interface has moved: "
                          f"{type(err).__name__}: {err})")
                else:
                    print(f"  {tr['steps']} steps of {batch} ({args.train_epochs} epochs of {tr['config'].repeat} "
                          f"passes), "
                          f"{tr['config'].num_workers} loader workers, K={tr['k']}, no bootstrapping")
                    ratios["train"] = show("train", tr, tr["steps"], unit="step")

        if device.type == "cuda" and vit and feats is not None:
            peak = bf16_peak(device)
            crop_flops = vit_forward_flops(backbone, (fcfg.crop_size, fcfg.crop_size)) * feats["crops"]
            work = vit_forward_flops(backbone, (size, size)) * n + crop_flops   # what stage and bare both run
            achieved, bare = work / min(feats["stage"]), work / min(feats["bare"])
            print(f"  features: {achieved / 1e12:.1f} TFLOP/s in the stage (training-size forwards + crops)"
                  + (f", {100 * achieved / peak:.1f}% of the bf16 peak ({peak / 1e12:.0f} TFLOP/s)" if peak else
                     " (bf16 peak of this GPU unknown)") + f"; the bare compute {bare / 1e12:.1f} TFLOP/s")

    if "loader" in stages:
        rate, how = loader_rate(max(32, args.images))
        if rate is None:
            print(f"loader_images_per_s_per_core=absent ({how})")
        else:
            print(f"loader_images_per_s_per_core={rate:.0f}   (from {how})")


if __name__ == "__main__":
    main()
