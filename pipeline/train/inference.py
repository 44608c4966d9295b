"""The trained segmenter: rebuilt from ``model.pt`` around its backbone, and run on images."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.errors import ProvenanceError
from pipeline.model import MaskTransformerDecoder, Segmenter
from pipeline.runtime import autocast, resolve_device
from pipeline.train.state import backbone_identity, read_model_file


def load_segmenter(backbone: nn.Module, path: str | Path, device: str | torch.device | None = None) -> Segmenter:
    """Rebuild the trained Segmenter from ``model.pt`` around ``backbone``; eval mode.

    Raises :class:`ProvenanceError` when the backbone is not the one it was trained on.
    """
    path = Path(path)
    ckpt = read_model_file(path)
    saved, now = ckpt["backbone"], backbone_identity(backbone)
    for key in ("name", "weights_id", "embed_dim", "patch_size"):
        if saved.get(key) is not None and now.get(key) is not None and saved[key] != now[key]:
            raise ProvenanceError(f"{path}: trained with backbone {key}={saved[key]!r}, given {now[key]!r}")
    decoder = MaskTransformerDecoder(**ckpt["decoder_args"])
    decoder.load_state_dict(ckpt["decoder"])
    model = Segmenter(backbone, decoder).eval()
    if device is not None:
        model = model.to(resolve_device(str(device)))
    return model


@torch.no_grad()
def predict_logits(model: Segmenter, images: Tensor) -> Tensor:
    """images (B, 3, H, W) in [0, 1] -> float32 logits (B, K, h, w) on the model's device."""
    device = next(model.decoder.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(device):
            logits = model(images.to(device, dtype=torch.float32))
    finally:
        model.train(was_training)
    return logits.float()
