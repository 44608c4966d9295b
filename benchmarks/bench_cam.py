"""Time the per-concept CAM loop against the batched CAM on identical inputs.

    python benchmarks/bench_cam.py                                  # ViT-S/16, 224, B=4, K=27
    python benchmarks/bench_cam.py --arch vit_small_patch8_224 --image-size 320 --batch 2

Backbones get random weights (no download); the timing does not depend on them.
Checks both implementations give the same maps and prints ``cam_speedup=<ratio>`` last.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pipeline.backbones import create_backbone, list_backbones
from pipeline.cam import compute_cams, compute_cams_loop


def _resolve_arch(arch: str) -> str:
    names = list_backbones()
    for candidate in (arch, f"{arch}.dino"):
        if candidate in names:
            return candidate
    sys.exit(f"unknown --arch {arch!r}; choose from {', '.join(names)}")


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` wall time in seconds, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch16_224", help="backbone name (.dino suffix optional)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=27, help="number of concepts")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per implementation (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    name = _resolve_arch(args.arch)
    backbone = create_backbone(name, pretrained=False)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen)
    centroids = torch.randn(args.k, backbone.embed_dim, generator=gen)
    h, w = backbone.grid(args.image_size, args.image_size)
    print(
        f"backbone={name} (random weights) image={args.image_size} grid={h}x{w} batch={args.batch} "
        f"K={args.k} threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    compute_cams(backbone, images[:1], centroids[:2])  # warm-up: allocator, kernels
    t_batched, batched = _time(lambda: compute_cams(backbone, images, centroids), max(args.repeats, 3))
    print(f"batched: {t_batched:.3f} s ({t_batched / args.batch:.3f} s/image)")
    t_loop, loop = _time(lambda: compute_cams_loop(backbone, images, centroids), args.repeats)
    print(f"loop:    {t_loop:.3f} s ({t_loop / args.batch:.3f} s/image, {t_loop / args.k:.3f} s/concept)")

    diff = (batched - loop).abs().max().item()
    print(f"max_abs_diff={diff:.3e} identical={diff <= 1e-5} cam_range=[{batched.min():.3g}, {batched.max():.3g}]")
    print(f"cam_speedup={t_loop / t_batched:.1f}")


if __name__ == "__main__":
    main()
