"""Time the per-concept CAM loop against the batched CAM on identical inputs.

    python benchmarks/bench_cam.py                                  # ViT-S/8, 224, B=2, K=27
    python benchmarks/bench_cam.py --arch vit_small_patch16_224 --batch 4 # the calibration layout

Backbones get random weights (no download); the timing does not depend on them.
Implementations timed (best of ``--repeats``, runs interleaved so that load from other
processes hits them alike):

* ``batched``   pipeline.cam.compute_cams: L-1 blocks without a graph, one vmapped
                backward for all K concepts.
* ``loop``      pipeline.cam.compute_cams_loop: per concept a full forward and a backward
                to the last attention map (frozen weights, so nothing else is differentiated).
* ``reference`` (the baseline; ``--no-reference`` skips it) what TransFGU's get_grad_mask costs: one forward recording
                a graph through every block with trainable encoder weights, then per concept
                ``loss.backward(retain_graph=True)`` into all parameters.

Checks that the maps agree, prints ``loop_speedup=<loop / batched>`` and, as the last line,
``cam_speedup=<reference / batched>``: the batched CAM against the per-concept procedure
of the reference code. (Our own loop already skips the graph through the first L-1
blocks, so it is a stronger baseline than the reference; both ratios are printed.)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch

from pipeline.backbones import BACKBONES, Backbone, create_backbone
from pipeline.cam import attention_gradient_cam, compute_cams, compute_cams_loop, concept_loss


def _resolve_arch(arch: str) -> str:
    names = BACKBONES.names()
    for candidate in (arch, f"{arch}.dino"):
        if candidate in names:
            return candidate
    sys.exit(f"unknown --arch {arch!r}; choose from {', '.join(names)}")


def reference_cams(backbone: Backbone, images: torch.Tensor, centroids: torch.Tensor, mass: float = 0.8) -> torch.Tensor:
    """TransFGU's procedure and cost: graph through all blocks, K full backward passes.

    ``backbone`` must have trainable parameters (a copy of a frozen one with
    ``requires_grad_(True)``), as the reference encoder had.
    """
    B, _, H, W = images.shape
    h, w = backbone.grid(H, W)
    with torch.enable_grad():
        inp = backbone.last_block_inputs(backbone.forward_tokens_before_last(images))
        attn = backbone.last_block_attention(inp)
        attn.retain_grad()
        embedding = backbone.last_block_from_attention(inp, attn)[:, 0]
        attn_cls = attn.detach().mean(1)[:, 0, 1:].reshape(B, h, w)
        cams = []
        for centroid in centroids:
            backbone.zero_grad(set_to_none=True)
            attn.grad = None
            concept_loss(embedding, centroid[None]).sum().backward(retain_graph=True)
            g = attn.grad.mean(1)[:, 0, 1:].reshape(B, 1, h, w)
            cams.append(attention_gradient_cam(attn_cls, g, mass))
    backbone.zero_grad(set_to_none=True)
    return torch.cat(cams, dim=1)


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch8_224", help="backbone name (.dino suffix optional)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--k", type=int, default=27, help="number of concepts")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per implementation; best is kept")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference's procedure (cam_speedup then falls back to the loop)")
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
        f"K={args.k} threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}"
    )

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "batched": lambda: compute_cams(backbone, images, centroids),
        "loop": lambda: compute_cams_loop(backbone, images, centroids),
    }
    if args.reference and backbone.has_attention:
        trainable = copy.deepcopy(backbone).requires_grad_(True)
        runs["reference"] = lambda: reference_cams(trainable, images, centroids)

    compute_cams(backbone, images[:1], centroids[:2])  # warm-up: allocator, kernel selection
    best: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(max(args.repeats, 1)):
        for key, fn in runs.items():
            seconds, outputs[key] = _timed(fn)
            best[key] = min(best.get(key, float("inf")), seconds)

    for key, seconds in best.items():
        print(f"{key + ':':11s}{seconds:8.3f} s  ({seconds / args.batch:.3f} s/image, {seconds / args.k:.3f} s/concept)")
    for key in runs:
        if key != "batched":
            diff = (outputs["batched"] - outputs[key]).abs().max().item()
            print(f"max_abs_diff(batched, {key})={diff:.3e} identical={diff <= 1e-5}")
    print(f"loop_speedup={best['loop'] / best['batched']:.1f}")
    baseline = "reference" if "reference" in best else "loop"
    print(f"cam_speedup={best[baseline] / best['batched']:.1f}")


if __name__ == "__main__":
    main()
