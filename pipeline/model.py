"""Segmentation model: a frozen backbone and a Segmenter-style mask transformer.

The decoder follows the reference's ``MaskTransformer`` (itself from Segmenter,
Strudel et al. 2021): project the patch features, append one learnable token per
concept, run a few pre-norm transformer blocks over [patches; class tokens], project
both and L2-normalise them, take their dot products as mask logits, and LayerNorm the
logits over the class axis ("mask_norm").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

if TYPE_CHECKING:  # the backbone module is written elsewhere; only its contract matters here
    from pipeline.backbones import Backbone

__all__ = ["MaskTransformerDecoder", "Segmenter", "resolve_d_model"]


def resolve_d_model(in_dim: int, n_heads: int, d_model: int | None = None) -> int:
    """Width of the decoder's token stream.

    ``d_model=None`` means "as wide as the backbone"; attention needs a width divisible
    by ``n_heads``, so a backbone width that is not (e.g. a CNN with 320 channels and 6
    heads) is rounded to the nearest multiple of ``n_heads`` (ties round up). The input
    projection absorbs the difference. An explicit ``d_model`` that is not divisible
    is a configuration error.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    if d_model is not None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        return int(d_model)
    if in_dim % n_heads == 0:
        return int(in_dim)
    return int(n_heads * max(1, int(in_dim / n_heads + 0.5)))


class MaskTransformerDecoder(nn.Module):
    """Mask transformer over frozen patch features.

    Args:
        in_dim: backbone feature width D.
        num_classes: number of concepts K (one class token each).
        n_layers: transformer blocks (paper: 2).
        n_heads: attention heads (paper: 6).
        d_model: token width; ``None`` = ``in_dim`` rounded to a multiple of ``n_heads``
            (see :func:`resolve_d_model`).
        dropout: dropout on attention weights and block outputs (paper: 0.1).
        token_init: "orthogonal" (orthonormal class tokens) or "reference" (the reference's
            initialisation: one random unit vector over all K x d token entries).

    The input projection is always a learned linear layer (as in the reference, which
    keeps it even when ``d_model == in_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        n_layers: int = 2,
        n_heads: int = 6,
        d_model: int | None = None,
        dropout: float = 0.1,
        token_init: str = "orthogonal",
    ) -> None:
        super().__init__()
        if token_init not in ("orthogonal", "reference"):
            raise ValueError(f"token_init must be orthogonal or reference, got {token_init!r}")
        d_model = resolve_d_model(in_dim, n_heads, d_model)
        self.in_dim = int(in_dim)
        self.num_classes = int(num_classes)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.d_model = d_model
        self.dropout = float(dropout)
        self.token_init = token_init

        self.proj_in = nn.Linear(in_dim, d_model)
        self.class_tokens = nn.Parameter(torch.empty(num_classes, d_model))
        self.blocks = nn.ModuleList(
            [
                Block(d_model, n_heads, mlp_ratio=4.0, qkv_bias=False, proj_drop=dropout, attn_drop=dropout)
                for _ in range(n_layers)
            ]
        )
        self.norm = nn.LayerNorm(d_model)
        # Bias-free projections with std d^-0.5 keep the projected vectors at unit scale.
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.mask_norm = nn.LayerNorm(num_classes)

        self.apply(self._init_weights)
        if token_init == "orthogonal":
            # Orthogonal tokens start the concepts maximally distinct (the diversity loss keeps
            # them apart). Rows are orthonormal when K <= d_model, columns otherwise.
            nn.init.orthogonal_(self.class_tokens)
        else:
            # The reference's (models/mask_transformer/decoder.py): orthogonal init of its
            # (1, K, d) cls_emb, which torch flattens to one row: a random unit vector of K x d
            # numbers, so the tokens are neither orthogonal nor of unit norm (about K^-1/2).
            with torch.no_grad():
                nn.init.orthogonal_(self.class_tokens.view(1, -1))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def config(self) -> dict[str, int | float]:
        """Constructor arguments, enough to rebuild the module for a state dict."""
        return {
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_model": self.d_model,
            "dropout": self.dropout,
            "token_init": self.token_init,
        }

    def forward(self, patch: Tensor, return_class_embeddings: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Mask logits from patch features.

        Args:
            patch: (B, h, w, D) backbone features.
            return_class_embeddings: also return the class embeddings.

        Returns:
            logits (B, K, h, w), LayerNorm-ed over K; with ``return_class_embeddings``
            also (B, K, d_model) L2-normalised class embeddings (input of the diversity loss).
        """
        b, h, w, d = patch.shape
        if d != self.in_dim:
            raise ValueError(f"patch features have width {d}, the decoder expects {self.in_dim}")
        x = self.proj_in(patch.reshape(b, h * w, d))
        x = torch.cat([x, self.class_tokens.unsqueeze(0).expand(b, -1, -1).to(x.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches, classes = x[:, : h * w], x[:, h * w :]
        patches = F.normalize(patches @ self.proj_patch.to(patches.dtype), dim=-1)
        classes = F.normalize(classes @ self.proj_classes.to(classes.dtype), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, hw, K)
        logits = masks.transpose(1, 2).reshape(b, self.num_classes, h, w)
        if return_class_embeddings:
            return logits, classes
        return logits


class Segmenter(nn.Module):
    """Frozen backbone + trainable decoder.

    ``forward(x)``: x (B, 3, H, W) in [0, 1] -> logits (B, K, h, w) at patch resolution.
    The backbone runs without gradients and stays in eval mode even under ``.train()``.
    """

    def __init__(self, backbone: "Backbone | nn.Module", decoder: MaskTransformerDecoder) -> None:
        super().__init__()
        embed_dim = getattr(backbone, "embed_dim", decoder.in_dim)
        if embed_dim != decoder.in_dim:
            raise ValueError(f"backbone embed_dim={embed_dim} but decoder in_dim={decoder.in_dim}")
        self.backbone = backbone
        self.decoder = decoder
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout / norm statistics of the encoder never change
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h, w, D) frozen patch features."""
        return self.backbone(x).patch

    def forward(self, x: Tensor, return_class_embeddings: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return self.decoder(self.features(x), return_class_embeddings=return_class_embeddings)
