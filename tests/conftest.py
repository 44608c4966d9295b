"""Fixtures shared by several test files: the registered backbones are built once per
session; `tiny_backbone` builds the one stand-in backbone the training and model tests use."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.backbones import Backbone, create_backbone


class TinyBackbone(nn.Module):
    """Stand-in for pipeline.backbones.Backbone: a frozen stride-``patch_size`` conv with a
    fixed (seeded) initialisation, and a dropout that would make outputs random if a caller
    let the backbone leave eval mode."""

    def __init__(self, dim: int = 24, patch_size: int = 8) -> None:
        super().__init__()
        self.name, self.weights_id = "tiny", "random:0"
        self.embed_dim, self.patch_size = dim, patch_size
        generator = torch.Generator().manual_seed(123)
        self.conv = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) / patch_size)
            self.conv.bias.zero_()
        self.dropout = nn.Dropout(0.5)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        f = self.dropout(self.conv(x)).permute(0, 2, 3, 1)
        return SimpleNamespace(patch=f, embedding=f.mean((1, 2)), saliency=f.norm(dim=-1), attention=None)


@pytest.fixture
def tiny_backbone() -> type[TinyBackbone]:
    """The class: call it for a fresh backbone (``tiny_backbone(dim=12)``)."""
    return TinyBackbone


@pytest.fixture(scope="session")
def vit_tiny() -> Backbone:
    return create_backbone("vit_tiny_random")


@pytest.fixture(scope="session")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0")
