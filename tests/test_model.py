"""MaskTransformerDecoder and Segmenter."""
from __future__ import annotations

import pytest
import torch

from pipeline.model import MaskTransformerDecoder, Segmenter, resolve_d_model


def test_decoder_shapes_and_class_embeddings():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder(in_dim=24, num_classes=5, n_layers=2, n_heads=6)
    logits, emb = dec(torch.randn(2, 4, 6, 24), return_class_embeddings=True)
    assert logits.shape == (2, 5, 4, 6)
    assert emb.shape == (2, 5, 24)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, 5), atol=1e-5)
    assert dec(torch.randn(1, 3, 3, 24)).shape == (1, 5, 3, 3)


def test_class_tokens_are_orthogonal_at_init():
    dec = MaskTransformerDecoder(in_dim=24, num_classes=7, n_heads=6)
    t = dec.class_tokens.detach()
    assert torch.allclose(t @ t.T, torch.eye(7), atol=1e-5)


def test_logits_are_layer_normed_over_classes():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder(in_dim=12, num_classes=6, n_heads=6).eval()
    logits = dec(torch.randn(3, 5, 5, 12))
    assert torch.allclose(logits.mean(dim=1), torch.zeros(3, 5, 5), atol=1e-5)
    assert torch.allclose(logits.var(dim=1, unbiased=False), torch.ones(3, 5, 5), atol=1e-2)  # eps of LayerNorm


def test_d_model_resolution():
    assert resolve_d_model(384, 6) == 384
    assert resolve_d_model(320, 6) == 318  # nearest multiple of 6
    assert resolve_d_model(10, 4) == 12  # tie rounds up
    assert resolve_d_model(10, 4, d_model=16) == 16
    with pytest.raises(ValueError, match="divisible"):
        resolve_d_model(10, 4, d_model=10)
    dec = MaskTransformerDecoder(in_dim=10, num_classes=3, n_heads=4)
    assert dec.d_model == 12
    assert dec(torch.randn(1, 2, 2, 10)).shape == (1, 3, 2, 2)


def test_segmenter_backbone_frozen_and_eval(tiny_backbone):
    torch.manual_seed(0)
    bb = tiny_backbone(dim=12)
    model = Segmenter(bb, MaskTransformerDecoder(12, 4, n_heads=6)).train()
    assert not bb.training and model.decoder.training
    x = torch.rand(2, 3, 32, 48)
    logits = model(x)
    assert logits.shape == (2, 4, 4, 6)
    logits.sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert any(p.grad is not None for p in model.decoder.parameters())
    model.eval()
    assert torch.equal(model(x), model(x))


def test_segmenter_rejects_width_mismatch(tiny_backbone):
    with pytest.raises(ValueError, match="embed_dim"):
        Segmenter(tiny_backbone(dim=12), MaskTransformerDecoder(24, 4, n_heads=6))


def test_reference_token_init_is_one_unit_vector_over_all_tokens():
    torch.manual_seed(0)
    ref = MaskTransformerDecoder(12, 5, n_heads=6, token_init="reference")
    tokens = ref.class_tokens.detach()
    assert torch.linalg.vector_norm(tokens).item() == pytest.approx(1.0, abs=1e-5)   # all K x d entries together
    gram = tokens @ tokens.T
    assert gram.diagonal().mean().item() == pytest.approx(1 / 5, rel=0.5)           # each token ~ K^-1/2 long
    orthogonal = MaskTransformerDecoder(12, 5, n_heads=6).class_tokens.detach()
    torch.testing.assert_close(orthogonal @ orthogonal.T, torch.eye(5), atol=1e-5, rtol=0)
    assert MaskTransformerDecoder(**ref.config()).token_init == "reference"
    with pytest.raises(ValueError, match="token_init"):
        MaskTransformerDecoder(12, 5, n_heads=6, token_init="xavier")
