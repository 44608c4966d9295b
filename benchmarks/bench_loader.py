"""Images per second per CPU core of the training input pipeline, on COCO-like 640x480 JPEGs.

    python benchmarks/bench_loader.py                      # 320x320 training size, K=27, 96 images
    python benchmarks/bench_loader.py --size 224 --concepts 7

Everything runs in this process on one thread (``torch.set_num_threads(1)``, loader without
workers), so a rate is a rate per core; the loader's workers multiply it by their number.
The JPEGs are synthetic scenes (flat regions, gradients and noise at several scales) saved
at quality 90, about 145 KB each, as COCO's; the CAMs are (K, h, w) in the HDF5 file the
pseudolabels stage writes (one uncompressed chunk per image), stored as the paper settings
store them (uint16).

Paths timed per sample, each from the file on disk to a batch (best of ``--repeats``):

* ``decode_resize`` (the baseline): PIL decode of the JPEG and the bilinear resize to the
  training size (``Manifest.image(i, size)``), nothing else.
* ``loader`` (what training runs): the training classes themselves, ``PseudoLabelDataset``
  over the decoded image cache (``ImageCache``: a row of a memory-mapped uint8 .npy) and the
  HDF5 CAMs (``CamReader``), batched by the ``GlobalBatches`` sampler and collated by the
  DataLoader, plus the epoch's random draws. Crop, colour jitter, blur and flip run batched
  on the training device (``augment_batch``); on a GPU they cost the CPU only their kernel
  launches, per batch.
* ``loader_cpu_augment``: the same, with the batched augmentation run on this CPU core as
  well (uint8 -> float, jitter, grayscale, blur, crop of image and CAMs, flip): what the CPU
  does per sample when there is no GPU.
* ``loader_jpeg``: the loader decoding and resizing the JPEG of every sample instead of
  reading the cache (``train.image_cache: false``), augmentation on the device.

Building the cache costs one ``decode_resize`` per image, once per run of the stage (not per
epoch); its rate is the baseline's. The last line is ``loader_images_per_s_per_core=<n>``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import TrainConfig
from pipeline.data.images import load_image, resize_image
from pipeline.settings import SETTINGS
from pipeline.store import CamReader, create_pseudolabel_file, encode_cams

CAM_DTYPE = SETTINGS.get("cocostuff27").params()["pseudolabels"]["cam_dtype"]
from pipeline.train.augment import augment_batch
from pipeline.train.data import PseudoLabelDataset, build_image_cache, collate_samples, raise_if_failed
from pipeline.train.distributed import Ranks
from pipeline.train.loop import GlobalBatches


def synthetic_photo(rng: np.random.Generator, height: int = 480, width: int = 640) -> np.ndarray:
    """A (H, W, 3) uint8 scene that JPEG-compresses like a photograph: a lit gradient, a dozen
    flat discs, and noise at three scales (texture, edges, sensor)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = rng.uniform(0, 255, 3) + rng.uniform(-0.2, 0.2, 3) * xx[..., None] + rng.uniform(-0.2, 0.2, 3) * yy[..., None]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 150)
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = rng.uniform(0, 255, 3)
    for scale, amplitude in ((16, 25.0), (4, 30.0), (1, 8.0)):
        noise = rng.normal(0, amplitude, (height // scale + 1, width // scale + 1, 3)).astype(np.float32)
        img += np.repeat(np.repeat(noise, scale, 0), scale, 1)[:height, :width]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_inputs(folder: Path, count: int, concepts: int, grid: tuple[int, int], seed: int = 0) -> tuple[list[Path], Path]:
    """``count`` JPEGs and their CAMs (smooth maps, as CAMs are) in an HDF5 file like the stage's."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(synthetic_photo(rng)).save(path, quality=90)
        paths.append(path)
    coarse = torch.from_numpy(rng.normal(0, 1, (count, concepts, 5, 5)).astype(np.float32))
    cams = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False).clamp_min(0).numpy()
    labels = folder / "pseudolabels.h5"
    # the file the pseudolabels stage writes, CAMs stored as the paper settings store them
    create_pseudolabel_file(labels, image_ids=[p.stem for p in paths], num_concepts=concepts, grid=grid,
                            attrs={}, cam_dtype=CAM_DTYPE)
    with h5py.File(labels, "r+") as handle:
        handle["cam"][:], handle["cam_scale"][:] = encode_cams(cams, CAM_DTYPE)
    return paths, labels


def best_rate(run: Callable[[], int], repeats: int) -> float:
    """Items per second of ``run()`` (which returns how many it did), best of ``repeats``."""
    best = 0.0
    for _ in range(repeats):
        tic = time.perf_counter()
        done = run()
        best = max(best, done / (time.perf_counter() - tic))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=320, help="training size (square), a multiple of --patch")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--concepts", type=int, default=27)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.images < args.batch:        # the loader drops a last partial batch: no batch, no rate
        parser.error(f"--images {args.images} must be at least --batch {args.batch}")
    torch.set_num_threads(1)
    size, grid = (args.size, args.size), (args.size // args.patch, args.size // args.patch)
    config = TrainConfig(batch_size=args.batch, num_workers=0)        # the paper's augmentation

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, labels = write_inputs(folder, args.images, args.concepts, grid)
        jpeg_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
        n = len(paths)

        def decode(position: int) -> np.ndarray:
            return resize_image(load_image(paths[position]), size)

        def decode_all() -> int:
            for i in range(n):
                decode(i)
            return n

        cache = build_image_cache(folder / "train_images.npy", decode, n, size, {"images": [str(p) for p in paths]},
                                  workers=1, log=lambda _: None)

        def through_loader(read_image: Callable[[int], np.ndarray], augment: bool) -> Callable[[], int]:
            dataset = PseudoLabelDataset(read_image, CamReader(labels, list(range(n))), n)
            batches = GlobalBatches(n, config, Ranks())
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=0, collate_fn=collate_samples,
                                generator=torch.Generator().manual_seed(0))

            def run() -> int:
                generator = torch.Generator().manual_seed(0)
                batches.order = torch.randperm(n, generator=generator).tolist()
                done = 0
                for batch in loader:
                    images, cams, _ = raise_if_failed(batch)
                    if augment:
                        augment_batch(images, cams.float(), config, args.patch, generator)
                    done += images.shape[0]
                return done
            return run

        rates = {}
        for _ in range(args.repeats):     # interleaved, so that load from other processes hits every path alike
            for name, run in (("decode_resize", decode_all),
                              ("loader", through_loader(cache, False)),
                              ("loader_cpu_augment", through_loader(cache, True)),
                              ("loader_jpeg", through_loader(decode, False))):
                rates[name] = max(rates.get(name, 0.0), best_rate(run, 1))

    print(f"{n} JPEGs 640x480 (mean {jpeg_kb:.0f} KB, quality 90) -> {args.size}x{args.size} uint8, "
          f"CAMs ({args.concepts}, {grid[0]}, {grid[1]}) {CAM_DTYPE} HDF5, batches of {args.batch}, one thread")
    print(f"cache: {n * args.size * args.size * 3 / 2**20:.1f} MiB for {n} images "
          f"({args.size * args.size * 3 / 1024:.0f} KiB per image; built once per stage run at the baseline's rate)")
    for name in ("decode_resize", "loader_jpeg", "loader_cpu_augment"):
        print(f"{name}_images_per_s_per_core={rates[name]:.0f}")
    print(f"loader_speedup_over_decode_resize={rates['loader'] / rates['decode_resize']:.1f}")
    print(f"loader_images_per_s_per_core={rates['loader']:.0f}")


if __name__ == "__main__":
    main()
