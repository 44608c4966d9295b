"""Does storing CAMs in float16 change the pseudo labels? Share of argmax flips on CamVid.

    python benchmarks/bench_cam_precision.py                         # 30 CamVid images, both paths
    python benchmarks/bench_cam_precision.py --images 20 --paths vit --concepts cache/concepts

For N CamVid images (spread over the manifest), the CAMs are computed in float32 with the
project's own code (`pipeline.pseudolabels.concept_maps` -> `pipeline.cam.compute_cams`),
converted to each storage dtype the way `write_pseudolabels` converts them, read back as
float32 (as `CamReader` and `evaluate.cam_scores` do), min-max normalised like training and
evaluation (`pipeline.cam.normalize_cams`, scope "image"), and their argmax over the concepts
is compared with that of the float32 CAMs, pixel by pixel on the patch grid.

Paths (each at the `camvid` setting's training size 240x320):

* ``efficientnet``: the offline EfficientNet-Lite0 (Grad-CAM), the `camvid` setting's
  pseudo-label parameters (grad_scale 1, no background).
* ``vit``: the paper's layout, ``vit_small_patch8_224.dino`` with ``pretrained=False`` (random
  weights from the registry's fixed seed: DINO weights need a download). ViT-S/8 rather than
  ``vit_tiny_random``: the CAM is ``attn / max(attn)`` plus the gradient term, and both the
  attention spread over 30x40 tokens and the gradient's size against it depend on the
  depth, width and heads, so the paper's layout is the one whose rounding matters. Each
  ``--grad-scales`` value is run (the paper's 1/8 for COCO/VOC, 1/2 for Cityscapes/LIP),
  each with and without the background channel (`add_background_channel`, which is what
  `concept_maps` appends when pseudolabels.background is true).

Centroids: `--concepts DIR` (a concepts stage output of the same backbone), else k-means
(`pipeline.concepts.kmeans`, K = 11 as the camvid setting) over crop embeddings of the same
images, cut as the features stage cuts them (`sliding_windows` at concept scale 2, crop
fractions 0.5/0.4/0.3, `embed_crops` at --crop-size).

Printed per path and variant: ``flip_share[<dtype>]`` = share of the pixels whose argmax
differs from the float32 one; ``tie_share[float32|<dtype>]``: pixels whose top two
normalised CAMs are exactly equal (ties resolve to the lower concept index);
``median_gap``: median over the untied pixels of the winner's normalised CAM minus the
runner-up's; ``gap_below_2^-10``: share of pixels with 0 < gap < 2^-10, the float16 spacing
on [1, 2) (the raw CAMs, attn / max(attn) + gradient term, reach past 1).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import Backbone, create_backbone
from pipeline.cam import add_background_channel, compute_cams, normalize_cams
from pipeline.concepts import Concepts, kmeans
from pipeline.config import PseudoLabelsConfig
from pipeline.data import Manifest, build_manifest
from pipeline.features import embed_crops, sliding_windows
from pipeline.pseudolabels import concept_maps
from pipeline.settings import SETTINGS
from pipeline.store import encode_cams

PATHS = {"efficientnet": "efficientnet_lite0", "vit": "vit_small_patch8_224.dino"}
STORE_DTYPES = ("float16", "uint16", "float32")


def stored(cams: torch.Tensor, dtype: str) -> torch.Tensor:
    """The CAMs as write_pseudolabels stores them (store.encode_cams) and readers read them back."""
    values, scale = encode_cams(cams.float().cpu().numpy(), dtype)
    return torch.from_numpy(values.astype(np.float32) * scale[:, None, None, None])


def argmax_labels(cams: torch.Tensor) -> torch.Tensor:
    return normalize_cams(cams.float(), "image").argmax(1)


def top2_gaps(cams: torch.Tensor) -> torch.Tensor:
    """Per pixel, the normalised CAM of the winning concept minus the runner-up's, (B, h, w)."""
    top2 = normalize_cams(cams.float(), "image").topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def tie_share(cams: torch.Tensor) -> float:
    return float((top2_gaps(cams) == 0).float().mean())


def crop_centroids(backbone: Backbone, manifest: Manifest, indices: list[int], size: tuple[int, int],
                   k: int, crop_size: int, batch: int) -> np.ndarray:
    """k-means over the crop embeddings of `indices`, windows as the features stage cuts them."""
    features = SETTINGS.get("camvid").params()["features"]
    concept = (int(round(size[0] * features["concept_scale"])), int(round(size[1] * features["concept_scale"])))
    windows = torch.from_numpy(sliding_windows(*concept, features["crop_fractions"], features["crop_stride"]))
    embeddings = []
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        images = manifest.batch(chunk, concept)
        owners = torch.arange(len(chunk)).repeat_interleave(len(windows))
        embeddings.append(embed_crops(backbone, images, windows.repeat(len(chunk), 1), owners, crop_size,
                                      64, torch.device("cpu")).numpy())
    points = np.concatenate(embeddings)
    model = kmeans(points, k, iterations=50, seed=0, max_points_per_centroid=256)
    print(f"  centroids: k-means K={k} over {len(points)} crop embeddings ({len(windows)} windows/image, "
          f"crop {crop_size})")
    return model.centroids.copy()


def measure(name: str, cams32: torch.Tensor) -> None:
    reference = argmax_labels(cams32)
    gaps = top2_gaps(cams32)
    # float16 keeps 11 significant bits: its spacing is 2^-10 on [1, 2), 2^-11 on [0.5, 1)
    line = [f"{name:28s} pixels={reference.numel():7d} tie_share[float32]={tie_share(cams32):.6f}",
            f"median_gap={gaps[gaps > 0].median().item() if (gaps > 0).any() else 0:.2e}",
            f"gap_below_2^-10={float(((gaps > 0) & (gaps < 2 ** -10)).float().mean()):.6f}"]
    for dtype in STORE_DTYPES:
        back = stored(cams32, dtype)
        flips = (argmax_labels(back) != reference).float().mean().item()
        line.append(f"flip_share[{dtype}]={flips:.6f}")
        if dtype != "float32":
            line.append(f"tie_share[{dtype}]={tie_share(back):.6f}")
    print("  " + "  ".join(line))


def run_path(path: str, manifest: Manifest, indices: list[int], args: argparse.Namespace) -> None:
    params = SETTINGS.get("camvid").params()
    size = tuple(params["features"]["image_size"])
    backbone = create_backbone(args.vit_arch if path == "vit" else PATHS[path], pretrained=path != "vit").eval()
    weights = "random weights, seed fixed" if path == "vit" else "offline pretrained weights"
    print(f"[{path}] backbone={backbone.name} ({weights}) size={size[0]}x{size[1]} "
          f"grid={backbone.grid(*size)} images={len(indices)}")
    tic = time.perf_counter()
    if args.concepts:
        centroids = Concepts.load(args.concepts, expected={"backbone": backbone.name}).centroids
        print(f"  centroids: {args.concepts} (K={len(centroids)})")
    else:
        centroids = crop_centroids(backbone, manifest, indices, size, args.k, args.crop_size, args.batch)
    centroids = torch.from_numpy(np.asarray(centroids, dtype=np.float32))
    base = PseudoLabelsConfig(**params["pseudolabels"])
    if path == "vit":
        variants = [replace(base, grad_scale=g) for g in args.grad_scales]
    else:
        variants = [base]
    for cfg in variants:
        cfg = replace(cfg, background=False)
        cams = torch.cat([concept_maps(backbone, manifest.batch(indices[s:s + args.batch], size), centroids, cfg)
                          for s in range(0, len(indices), args.batch)])
        measure(f"grad_scale={cfg.grad_scale:g}", cams)
        # pseudolabels.frozen_bf16: the frozen part under bf16 autocast (CPU autocast here: the
        # same bf16 rounding of the frozen part's outputs as on CUDA, up to accumulation order)
        low = torch.cat([compute_cams(backbone, manifest.batch(indices[s:s + args.batch], size), centroids,
                                      mass=cfg.mass, grad_scale=cfg.grad_scale, frozen_dtype=torch.bfloat16)
                         for s in range(0, len(indices), args.batch)])
        flips = (argmax_labels(low) != argmax_labels(cams)).float().mean().item()
        print(f"  {'':28s} flip_share[bf16 frozen part, float32 stored]={flips:.6f}  "
              f"flip_share[bf16 frozen part, uint16 stored]="
              f"{(argmax_labels(stored(low, 'uint16')) != argmax_labels(cams)).float().mean().item():.6f}")
        if path == "vit":
            measure(f"grad_scale={cfg.grad_scale:g} +background",
                    add_background_channel(cams, threshold=cfg.background_threshold))
    print(f"  ({time.perf_counter() - tic:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=30, help="CamVid images (spread over the manifest)")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/camvid"))
    parser.add_argument("--paths", default="efficientnet,vit", help=f"comma-separated: {', '.join(PATHS)}")
    parser.add_argument("--concepts", default="", help="concepts folder of the same backbone (default: k-means here)")
    parser.add_argument("--k", type=int, default=11, help="concepts when clustering here (camvid: 11)")
    parser.add_argument("--crop-size", type=int, default=96, help="crop side for the k-means embeddings")
    parser.add_argument("--grad-scales", type=lambda s: [float(v) for v in s.split(",")], default=[0.125, 0.5],
                        help="ViT grad_scale values (paper: 1/8 COCO/VOC, 1/2 Cityscapes/LIP)")
    parser.add_argument("--vit-arch", default=PATHS["vit"], help="the ViT path's backbone (vit_tiny_random: tests' ViT)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    manifest = build_manifest("camvid", args.root)
    n = len(manifest.records)
    indices = sorted({int(i) for i in np.linspace(0, n - 1, min(args.images, n))})
    print(f"CamVid {args.root}: {n} images, using {len(indices)}; torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    for path in [p.strip() for p in args.paths.split(",") if p.strip()]:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
        run_path(path, manifest, indices, args)


if __name__ == "__main__":
    main()
