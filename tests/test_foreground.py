"""The foreground mask that classes crop windows as thing or stuff: today's upsampled saliency,
or the reference's mask from a forward pass at the concept scale."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import FeaturesConfig
from pipeline.data import build_manifest, generate_synthetic
from pipeline.errors import InputError
from pipeline.features import FeatureLayout, extract_features, foreground_mask


def test_threshold_on_the_grid_then_nearest_upsampling():
    saliency = torch.tensor([[[0.0, 3.0], [0.0, 1.0]]])        # mean 1: cell (0, 1) only
    mask = foreground_mask(saliency, (4, 4), threshold_first=True)
    assert mask[0].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    # upsampling first blurs the border: the bilinear map crosses its own mean elsewhere
    upsampled = foreground_mask(saliency, (4, 4))
    assert upsampled[0].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("foreground, passes_at_concept_size", [("upsampled", 0), ("concept_scale", 1)])
def test_concept_scale_mask_comes_from_a_pass_at_the_concept_size(tmp_path, vit_tiny, monkeypatch, foreground,
                                                                  passes_at_concept_size):
    generate_synthetic(tmp_path / "data", n_train=2, n_val=0, size=(64, 64), seed=2)
    manifest = build_manifest("synthetic", tmp_path / "data")
    cfg = FeaturesConfig(image_size=[64, 64], concept_scale=2.0, crop_fractions=[0.5], crop_size=32,
                         pools=["thing", "stuff"], foreground=foreground, chunk_images=2)
    sizes = []
    real = type(vit_tiny).forward
    monkeypatch.setattr(type(vit_tiny), "forward", lambda self, x, *a, **k: sizes.append(tuple(x.shape[-2:]))
                        or real(self, x, *a, **k))
    extract_features(manifest, vit_tiny, cfg, tmp_path / "f.zarr", crop_split="train", batch_size=2,
                     device=torch.device("cpu"), show_progress=False)
    assert sizes.count((128, 128)) == passes_at_concept_size   # crops are embedded at 32x32, not 128


def test_concept_scale_needs_a_concept_size_on_the_patch_grid(vit_tiny):
    cfg = FeaturesConfig(image_size=[64, 64], concept_scale=1.5625, foreground="concept_scale")   # 100x100
    with pytest.raises(InputError, match="multiple of the patch size 8"):
        FeatureLayout.from_config(cfg, vit_tiny)
    with pytest.raises(ValueError, match="foreground must be one of upsampled, concept_scale"):
        FeaturesConfig(foreground="attention")


def test_reference_windows_are_the_reference_anchors():
    """Boxes of the reference's generate_box_anchors_by_scale(h, w, scales=(0.5, 0.4, 0.3, 0.2))
    upsampled to pixels as cocostuff_crop.py does (computed by running the reference code once;
    (y0, x0, y1, x1) with y1, x1 the exclusive ends it slices with)."""
    from pipeline.features import reference_windows

    coco = reference_windows(640, 640, 8, [0.5, 0.4, 0.3, 0.2])            # 80 x 80 grid
    assert len(coco) == 142
    assert coco[:3].tolist() == [[0, 0, 327, 327], [0, 160, 327, 487], [0, 312, 327, 639]]
    assert coco[-3:].tolist() == [[504, 384, 639, 519], [504, 448, 639, 583], [504, 504, 639, 639]]
    assert len(reference_windows(320, 640, 8, [0.5, 0.4, 0.3, 0.2])) == 306   # 40 x 80
    odd = reference_windows(240, 320, 8, [0.5, 0.4, 0.3, 0.2])               # 30 x 40: odd sides
    assert len(odd) == 140 and odd[:2].tolist() == [[64, 64, 183, 183], [64, 184, 183, 303]]
    assert odd[-1].tolist() == [184, 264, 239, 319]
