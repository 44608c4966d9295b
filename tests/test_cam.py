"""CAMs: batched == per-concept loop, the paper's formula, post-processing."""
from __future__ import annotations

import pytest
import torch

from pipeline.backbones import Backbone
from pipeline.cam import (
    add_background_channel,
    cams_to_labels,
    compute_cams,
    compute_cams_loop,
    concept_loss,
    CAM_METHODS,
    normalize_cams,
    top_mass_mask,
)


def _inputs(backbone: Backbone, b: int, h: int, w: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=gen)
    centroids = torch.randn(k, backbone.embed_dim, generator=gen)
    return images, centroids


def test_cam_methods_registered() -> None:
    assert {"attention_gradient", "gradcam"} <= set(CAM_METHODS.names())


@pytest.mark.parametrize("grad_scale", [1.0, 0.125])
def test_vit_batched_equals_loop(vit_tiny: Backbone, grad_scale: float) -> None:
    images, centroids = _inputs(vit_tiny, 3, 48, 64, 6)
    batched = compute_cams(vit_tiny, images, centroids, grad_scale=grad_scale)
    loop = compute_cams_loop(vit_tiny, images, centroids, grad_scale=grad_scale)
    assert batched.shape == (3, 6, 6, 8) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    assert (batched >= 0).all()


def test_efficientnet_batched_equals_loop(lite0: Backbone) -> None:
    images, centroids = _inputs(lite0, 2, 64, 96, 4)
    batched = compute_cams(lite0, images, centroids)
    loop = compute_cams_loop(lite0, images, centroids)
    assert batched.shape == (2, 4, 4, 6) and batched.dtype == torch.float32
    assert batched.max() > 0
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-4)
    assert (batched >= 0).all()


def _reference_gradient(backbone: Backbone, images: torch.Tensor, centroid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain autograd on the full attention map: g and the [CLS] attention, both (B, h, w)."""
    B, _, H, W = images.shape
    h, w = backbone.grid(H, W)
    inp = backbone.last_block_inputs(backbone.forward_tokens_before_last(images))
    attn = backbone.last_block_attention(inp).detach().requires_grad_()
    with torch.enable_grad():
        emb = backbone.last_block_from_attention(inp, attn)[:, 0]
        (1 - torch.cosine_similarity(emb, centroid[None], dim=-1)).sum().backward()
    g = attn.grad.mean(1)[:, 0, 1:].reshape(B, h, w)
    return g, attn.detach().mean(1)[:, 0, 1:].reshape(B, h, w)


def _slow_top_mass(values: torch.Tensor, mass: float) -> torch.Tensor:
    """Keep the largest values until the ones kept *before* each reach ``mass`` of the total."""
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    flat = values.flatten()
    total, acc = flat.sum().item(), 0.0
    for idx in torch.argsort(flat, descending=True, stable=True).tolist():
        if total > 0 and acc < mass * total:
            keep[idx] = True
        acc += flat[idx].item()
    return keep.view_as(values)


def test_vit_cam_follows_the_paper_formula(vit_tiny: Backbone) -> None:
    images, centroids = _inputs(vit_tiny, 2, 64, 64, 3, seed=1)
    cams = compute_cams(vit_tiny, images, centroids, mass=0.8)
    for c, centroid in enumerate(centroids):
        g, attn = _reference_gradient(vit_tiny, images, centroid)
        for b in range(2):
            neg = (-g[b]).clamp_min(0)
            expected = attn[b] / attn[b].max() + neg * _slow_top_mass(neg, 0.8)
            expected[g[b] > 0] = 0
            torch.testing.assert_close(cams[b, c], expected, atol=1e-5, rtol=0)
            assert (cams[b, c][g[b] > 0] == 0).all()
            assert (g[b] > 0).any() and (g[b] < 0).any()  # both branches exercised


def test_top_mass_mask_matches_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(5, 37, generator=gen) ** 3
    values[0, :20] = 0
    for mass in (0.5, 0.8, 0.95):
        got = top_mass_mask(values, mass)
        want = torch.stack([_slow_top_mass(row, mass) for row in values])
        assert torch.equal(got, want)
        kept = (values * got).sum(-1) / values.sum(-1)
        assert (kept >= mass - 1e-6).all()
    assert not top_mass_mask(torch.zeros(2, 9), 0.8).any()


def test_cams_do_not_depend_on_batch_mates(vit_tiny: Backbone) -> None:
    images, centroids = _inputs(vit_tiny, 3, 40, 48, 4, seed=2)
    together = compute_cams(vit_tiny, images, centroids)
    alone = torch.cat([compute_cams(vit_tiny, images[i : i + 1], centroids) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_cams_are_deterministic(vit_tiny: Backbone, lite0: Backbone) -> None:
    for backbone, size in ((vit_tiny, (48, 48)), (lite0, (64, 64))):
        images, centroids = _inputs(backbone, 2, *size, 3, seed=3)
        assert torch.equal(compute_cams(backbone, images, centroids), compute_cams(backbone, images, centroids))


def test_cams_leave_no_graph_and_no_grads(vit_tiny: Backbone) -> None:
    images, centroids = _inputs(vit_tiny, 1, 32, 32, 2)
    cams = compute_cams(vit_tiny, images, centroids)
    assert not cams.requires_grad
    assert all(p.grad is None for p in vit_tiny.parameters())


def test_cams_work_inside_no_grad_and_inference_mode(vit_tiny: Backbone, lite0: Backbone) -> None:
    for backbone in (vit_tiny, lite0):
        images, centroids = _inputs(backbone, 1, 32, 32, 2)
        want = compute_cams(backbone, images, centroids)
        with torch.no_grad():
            torch.testing.assert_close(compute_cams(backbone, images, centroids), want)
        with torch.inference_mode():
            images_inf, centroids_inf = images.clone(), centroids.clone()
            torch.testing.assert_close(compute_cams(backbone, images_inf, centroids_inf), want)


def test_wrong_centroid_dimension_is_rejected(vit_tiny: Backbone) -> None:
    images, _ = _inputs(vit_tiny, 1, 32, 32, 2)
    with pytest.raises(ValueError, match=r"centroids must be \(K, 96\)"):
        compute_cams(vit_tiny, images, torch.randn(2, 95))


def test_concept_loss_is_one_minus_cosine() -> None:
    e, c = torch.randn(3, 7), torch.randn(4, 7)
    want = 1 - torch.cosine_similarity(e[:, None], c[None], dim=-1)
    torch.testing.assert_close(concept_loss(e, c), want)


# --------------------------------------------------------------------------- post-processing


def test_background_channel() -> None:
    cams = torch.rand(2, 5, 4, 6)
    cams[0, :, 0, 0] = 0  # a pixel no concept claims
    out = add_background_channel(cams, threshold=0.1)
    assert out.shape == (2, 6, 4, 6)
    assert out[0, -1, 0, 0] == pytest.approx(0.1)  # background is the last channel
    torch.testing.assert_close(out[:, :-1], normalize_cams(cams))
    assert ((out[:, -1] >= 0) & (out[:, -1] <= 0.1)).all()
    background = out[:, -1] > 0
    assert torch.equal(background, out[:, :-1].amax(1) < 0.1)
    assert (cams_to_labels(out)[0, 0, 0] == 5).item()  # normalising again keeps the ranking


def test_normalize_cams_scopes() -> None:
    cams = torch.stack([torch.full((2, 2), 2.0), torch.tensor([[1.0, 3.0], [1.0, 1.0]])])[None]
    by_image = normalize_cams(cams, "image")
    assert by_image.min() == 0 and by_image.max() == 1
    torch.testing.assert_close(by_image[0, 0], torch.full((2, 2), 0.5))
    by_concept = normalize_cams(cams, "concept")
    assert torch.equal(by_concept[0, 0], torch.zeros(2, 2))  # constant map -> 0
    with pytest.raises(ValueError):
        normalize_cams(cams, "pixel")


def test_cams_to_labels() -> None:
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 0, 0, 0] = 5.0
    cams[0, 1, 0, 1] = 1.0
    cams[0, 2, 1, :] = 0.5
    labels = cams_to_labels(cams)
    assert labels.dtype == torch.int64 and labels.shape == (1, 2, 2)
    assert labels.tolist() == [[[0, 1], [2, 2]]]
    # per-image scaling never changes the ranking; per-concept scaling can
    assert torch.equal(cams_to_labels(cams * 7 + 1), labels)
    weak = torch.tensor([[[[1.0, 0.9]], [[0.0, 0.2]]]])  # concept 1 is weak everywhere
    assert cams_to_labels(weak, "image").tolist() == [[[0, 0]]]
    assert cams_to_labels(weak, "concept").tolist() == [[[0, 1]]]


@pytest.mark.parametrize("which", ["vit", "cnn"])
def test_frozen_part_in_bf16_moves_the_cams_a_little_and_stays_float32(vit_tiny: Backbone, lite0: Backbone,
                                                                        which: str) -> None:
    # pseudolabels.frozen_bf16: only the part without gradient runs in bf16 (CPU autocast here)
    backbone = vit_tiny if which == "vit" else lite0
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    centroids = torch.randn(4, backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    full = compute_cams(backbone, images, centroids)
    low = compute_cams(backbone, images, centroids, frozen_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == full.shape
    assert not torch.equal(low, full)
    # bf16 keeps 8 significant bits: the maps move by a few percent, their argmax hardly
    assert (low - full).norm() <= 0.15 * full.norm()
    assert (cams_to_labels(low) == cams_to_labels(full)).float().mean() >= 0.9
    assert torch.equal(compute_cams(backbone, images, centroids, frozen_dtype=None), full)
