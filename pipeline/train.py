"""Training of the segmentation decoder on CAM pseudo labels, with bootstrapping.

What one epoch does (method.md, "Training"; reference ``*_trainval.py`` and
``models/segmenter/segmenter_thingstuff.py`` of damo-cv/TransFGU):

1. A batch of images at the training size (B, 3, H, W) and their CAMs (B, K, h, w).
2. Augmentation on the device: colour jitter / grayscale / blur on the full image, a
   random crop (side = ``crop_scale`` x image side, image aspect kept) resized to
   ``crop_output_fraction`` of the training size, the CAMs cropped by the same box with
   ``roi_align`` onto the crop's patch grid, and a horizontal flip of both.
3. Targets: argmax over K of min-max normalised CAMs; while bootstrapping, of
   ``teacher_mix * softmax(teacher logits) + (1 - teacher_mix) * normalised CAMs``.
4. Loss = CE + ``uncertainty_weight`` x (1 - (p_top1 - p_top2))
   + ``diversity_weight`` x mean over class pairs of (1 + cos)
   - alpha x CE(permuted-class target)  [peer loss, bootstrapping only].
5. Adam with L2 weight decay (not on biases / norms), gradients clamped element-wise.

Bootstrapping schedule (reference semantics): ``teacher_interval`` is one int or a list
whose i-th entry holds for epochs ``[i*teacher_interval_block, (i+1)*teacher_interval_block)``
(the last entry holds for ever after); an epoch ``e >= bootstrap_start`` with
``e % interval(e) == 0`` starts with a teacher update: teacher <- student,
student <- its initial weights. Epochs are 0-based. alpha = ``peer_alpha_start +
peer_alpha_step * (epochs since the last teacher update)``, capped at ``peer_alpha_end``.

Unsupervised model selection: no labels are ever read; the final model is the last one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from pipeline.data.images import images_to_tensor
from pipeline.errors import InputError, ProvenanceError
from pipeline.runtime import autocast, progress, resolve_device
from pipeline.model import MaskTransformerDecoder, Segmenter

__all__ = [
    "TrainConfig",
    "PseudoLabelDataset",
    "augment_batch",
    "sample_crop_boxes",
    "crop_and_resize",
    "photometric_augment",
    "normalise_cams",
    "pseudo_targets",
    "uncertainty_loss",
    "diversity_loss",
    "teacher_interval_at",
    "is_teacher_update_epoch",
    "teacher_update_epochs",
    "peer_alpha",
    "teacher_update",
    "train_segmenter",
    "load_segmenter",
    "predict_logits",
]

CHECKPOINT_FORMAT = "transfgu-train/1"
MODEL_FORMAT = "transfgu-segmenter/1"
LOG_COLUMNS = ("epoch", "loss", "ce", "uncertainty", "diversity", "peer", "alpha", "teacher_update", "seconds")
# Fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "device", "predict_with"})


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Every training constant of the method, defaults = paper / reference (COCO-Stuff-27).

    Per-dataset settings of the paper (method.md table): COCO-Stuff-171 uses
    ``teacher_interval=[3, 3, 3, 2], bootstrap_start=3``; Cityscapes ``epochs=50,
    lr=5e-5, teacher_interval=1, bootstrap_start=1``; VOC ``epochs=100, batch_size=512,
    teacher_interval=[5, 5, 5, 5, 4, 4, 4, 4, 4, 3], bootstrap_start=5``.
    """

    # optimisation
    epochs: int = 200
    lr: float = 1e-4
    batch_size: int = 256
    weight_decay: float = 5e-4  # Adam L2; biases and 1-D (norm) parameters are exempt
    grad_clip_value: float = 1.0  # element-wise clamp of every gradient to +-value
    # decoder (paper: 2 blocks, 6 heads, d = backbone width, dropout 0.1)
    decoder_layers: int = 2
    decoder_heads: int = 6
    decoder_dim: int | None = None
    decoder_dropout: float = 0.1
    # augmentation
    crop_scale: tuple[float, float] = (0.4, 0.9)  # crop SIDE fraction of the image side, aspect kept
    crop_output_fraction: float = 0.5  # crop resized to this fraction of the training size
    jitter_p: float = 0.3
    jitter_strength: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (1.0, 2.0)
    hflip: bool = True  # each sample flipped with p = 0.5
    # losses
    cam_norm: str = "sample"  # "sample": one min/max per image over all K (reference); "channel": per concept
    uncertainty_weight: float = 0.3
    diversity_weight: float = 1.0
    # bootstrapping
    bootstrap: bool = True
    bootstrap_start: int = 2  # 0-based epoch; always a teacher-update epoch
    teacher_interval: int | list[int] = 2
    teacher_interval_block: int = 10  # epochs covered by each entry of a teacher_interval list
    teacher_mix: float = 0.5  # weight of softmax(teacher) in the bootstrapped target
    peer_alpha_start: float = 0.03
    peer_alpha_end: float = 0.10
    peer_alpha_step: float = 0.01  # per epoch since the last teacher update
    reset_optimizer: bool = False  # reference keeps Adam's state across student resets
    predict_with: str = "student"  # model.pt holds the student (what the reference evaluates) or "teacher"
    # run
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        self.jitter_strength = tuple(float(v) for v in self.jitter_strength)  # type: ignore[assignment]
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        self.teacher_interval = _parse_intervals(self.teacher_interval)
        lo, hi = self.crop_scale
        if not (len(self.crop_scale) == 2 and 0 < lo <= hi <= 1):
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 < self.crop_output_fraction <= 1:
            raise ValueError(f"crop_output_fraction must be in (0, 1], got {self.crop_output_fraction}")
        if len(self.jitter_strength) != 4:
            raise ValueError(f"jitter_strength needs 4 values, got {self.jitter_strength}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "teacher_mix"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and positive, got {self.blur_kernel}")
        if self.cam_norm not in ("sample", "channel"):
            raise ValueError(f"cam_norm must be 'sample' or 'channel', got {self.cam_norm!r}")
        if self.predict_with not in ("student", "teacher"):
            raise ValueError(f"predict_with must be 'student' or 'teacher', got {self.predict_with!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.teacher_interval_block < 1 or self.bootstrap_start < 0:
            raise ValueError("epochs, bootstrap_start must be >= 0; batch_size, teacher_interval_block >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a params.yaml section; unknown keys are an error (typos must not pass)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training parameters: {unknown}; known: {sorted(known)}")
        return cls(**values)


def _parse_intervals(value: int | str | Sequence[int]) -> int | list[int]:
    """Accepts 2, [3, 3, 3, 2] or the reference's "3,3,3,2"."""
    if isinstance(value, str):
        value = [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, (int, np.integer)):
        values = [int(value)]
    else:
        values = [int(v) for v in value]
    if not values or min(values) < 1:
        raise ValueError(f"teacher_interval must be positive integers, got {value!r}")
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- schedule


def teacher_interval_at(epoch: int, config: TrainConfig) -> int:
    """Teacher-update interval in force at ``epoch`` (reference: one list entry per
    ``teacher_interval_block`` epochs, the last entry repeating)."""
    intervals = config.teacher_interval if isinstance(config.teacher_interval, list) else [config.teacher_interval]
    return intervals[min(epoch // config.teacher_interval_block, len(intervals) - 1)]


def is_teacher_update_epoch(epoch: int, config: TrainConfig) -> bool:
    """Whether epoch ``epoch`` (0-based) starts with teacher <- student, student <- init.

    Reference rule: ``epoch >= bootstrap_start and epoch % interval == 0``. We also force
    an update at ``bootstrap_start`` itself so bootstrapping never starts against an
    untrained teacher (the reference would, if ``bootstrap_start`` were not a multiple of
    the interval; for all of the paper's settings the two rules agree).
    """
    if not config.bootstrap or epoch < config.bootstrap_start:
        return False
    return epoch == config.bootstrap_start or epoch % teacher_interval_at(epoch, config) == 0


def teacher_update_epochs(config: TrainConfig) -> list[int]:
    """All teacher-update epochs of a run of ``config.epochs`` epochs."""
    return [e for e in range(config.epochs) if is_teacher_update_epoch(e, config)]


def peer_alpha(epochs_since_update: int, config: TrainConfig) -> float:
    """Weight of the peer (negative) loss: the reference's list 0.03, 0.04, ..., 0.10
    indexed by epochs since the last teacher update, its last value repeating."""
    alpha = config.peer_alpha_start + config.peer_alpha_step * epochs_since_update
    return round(min(alpha, config.peer_alpha_end), 10)


# --------------------------------------------------------------------------- data


class PseudoLabelDataset(Dataset):
    """Images with their CAMs.

    Args:
        read_image: index -> (H, W, 3) uint8, already at the training size.
        read_cam: index -> (K, h, w) float CAMs on the patch grid of that size.
        length: number of items.

    Items: (image float32 (3, H, W) in [0, 1], cam float32 (K, h, w), index).
    """

    def __init__(
        self,
        read_image: Callable[[int], np.ndarray],
        read_cam: Callable[[int], np.ndarray],
        length: int,
    ) -> None:
        self.read_image = read_image
        self.read_cam = read_cam
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        img = np.asarray(self.read_image(index))
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {index}: expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
        cam = np.asarray(self.read_cam(index), dtype=np.float32)
        if cam.ndim != 3:
            raise ValueError(f"cam {index}: expected (K, h, w), got {cam.shape}")
        image = images_to_tensor(img)[0]
        return image, torch.from_numpy(np.ascontiguousarray(cam)), index


# --------------------------------------------------------------------------- augmentation


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def sample_crop_boxes(n: int, size: tuple[int, int], scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Random crop boxes, one per sample.

    The box side is ``s x`` the image side with ``s ~ U(scale)`` (the reference's
    "scale"; image aspect kept), placed uniformly inside the image.

    Returns: (n, 4) float32 boxes ``(x0, y0, x1, y1)`` in pixel units (pixel i spans [i, i+1)).
    """
    height, width = size
    s = _uniform(n, scale[0], scale[1], generator)
    bh, bw = s * height, s * width
    y0 = torch.rand(n, generator=generator) * (height - bh)
    x0 = torch.rand(n, generator=generator) * (width - bw)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)


def crop_and_resize(
    images: Tensor, cams: Tensor, boxes: Tensor, out_size: tuple[int, int], cam_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Crop images and CAMs by the same boxes.

    Args:
        images: (B, 3, H, W).
        cams: (B, K, h, w); cell j spans pixels [j*H/h, (j+1)*H/h).
        boxes: (B, 4) ``(x0, y0, x1, y1)`` in image pixels.
        out_size: (H', W') of the image crops.
        cam_size: (h', w') of the CAM crops (the crops' patch grid).

    Returns: images (B, 3, H', W'), cams (B, K, h', w'), both float32. ``aligned=True``
    roi_align puts both on one continuous coordinate frame, so a crop cell covers
    exactly the pixels of its patch in the image crop.
    """
    b, _, height, width = images.shape
    h, w = cams.shape[-2:]
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    batch_idx = torch.arange(b, device=images.device, dtype=torch.float32)[:, None]
    img_rois = torch.cat([batch_idx, boxes], dim=1)
    # Separate x / y scales: roi_align has one spatial_scale, CAM grids need not be square.
    cam_scale = torch.tensor([w / width, h / height, w / width, h / height], device=images.device)
    cam_rois = torch.cat([batch_idx, boxes * cam_scale], dim=1)
    # 2x2 samples per output pixel anti-alias the image; for the coarse CAM grid the
    # reference's adaptive count (ceil(bin size)) avoids sampling past edge cell centres.
    out = roi_align(images.float(), img_rois, out_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    cam_out = roi_align(cams.float(), cam_rois, cam_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return out, cam_out


def _gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma (ITU-R 601, as torchvision)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Per-sample separable Gaussian blur with reflect padding. x (N, C, H, W), sigma (N,)."""
    n, c, height, width = x.shape
    r = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    k1d = torch.exp(-0.5 * (r[None] / sigma[:, None].to(x)) ** 2)
    k1d = (k1d / k1d.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1d[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k1d[:, None, None, :], groups=n * c)
    return y.reshape(n, c, height, width)


def photometric_augment(images: Tensor, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """Colour jitter, grayscale and blur, each drawn per sample.

    images (B, 3, H, W) in [0, 1] -> same shape. Jitter factors are drawn per sample
    like torchvision's ``ColorJitter`` (brightness/contrast/saturation in
    [1-s, 1+s], hue in [-s, s]); one random order of the four ops per batch. The
    reference draws each "apply?" once per batch; per-sample draws give the same rate.
    """
    b = images.shape[0]
    out = images
    jit = torch.rand(b, generator=generator) < config.jitter_p
    gray = torch.rand(b, generator=generator) < config.grayscale_p
    blur = torch.rand(b, generator=generator) < config.blur_p
    bs, cs, ss, hs = config.jitter_strength
    factors = torch.stack(
        [
            _uniform(b, max(0.0, 1 - bs), 1 + bs, generator),
            _uniform(b, max(0.0, 1 - cs), 1 + cs, generator),
            _uniform(b, max(0.0, 1 - ss), 1 + ss, generator),
            _uniform(b, -hs, hs, generator),
        ],
        dim=1,
    )
    order = torch.randperm(4, generator=generator).tolist()
    sigma = _uniform(b, config.blur_sigma[0], config.blur_sigma[1], generator)

    if jit.any():
        idx = jit.nonzero().squeeze(1)
        x = out[idx.to(out.device)]
        f = factors[idx].to(x.device, x.dtype)[:, :, None, None, None]
        for op in order:
            if op == 0:
                x = (x * f[:, 0]).clamp_(0, 1)
            elif op == 1:
                x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f[:, 1])
            elif op == 2:
                x = _blend(x, _gray(x), f[:, 2])
            else:
                x = torch.stack([TF.adjust_hue(xi, float(hi)) for xi, hi in zip(x, factors[idx, 3])])
        out = out.clone()
        out[idx.to(out.device)] = x
    if gray.any():
        mask = gray.to(out.device)[:, None, None, None]
        out = torch.where(mask, _gray(out).expand_as(out), out)
    if blur.any():
        idx = blur.nonzero().squeeze(1)
        out = out.clone()
        out[idx.to(out.device)] = _gaussian_blur(out[idx.to(out.device)], sigma[idx], config.blur_kernel)
    return out


def augment_batch(
    images: Tensor,
    cams: Tensor,
    config: TrainConfig,
    patch_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Full training augmentation of a batch, on the batch's device.

    Args:
        images: (B, 3, H, W) in [0, 1] at the training size.
        cams: (B, K, h, w) on the training size's patch grid.
        patch_size: backbone output stride; the crop size is rounded to a multiple of it.
        generator: CPU generator all random draws come from (reproducible, resumable).

    Returns: images (B, 3, H', W'), cams (B, K, H'/p, W'/p) with
    H' ~= crop_output_fraction x H.
    """
    b, _, height, width = images.shape
    out_h = max(patch_size, int(round(height * config.crop_output_fraction / patch_size)) * patch_size)
    out_w = max(patch_size, int(round(width * config.crop_output_fraction / patch_size)) * patch_size)
    images = photometric_augment(images, config, generator)
    boxes = sample_crop_boxes(b, (height, width), config.crop_scale, generator)
    images, cams = crop_and_resize(images, cams, boxes, (out_h, out_w), (out_h // patch_size, out_w // patch_size))
    if config.hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)[:, None, None, None]
        images = torch.where(flip, images.flip(-1), images)
        cams = torch.where(flip, cams.flip(-1), cams)
    return images, cams


# --------------------------------------------------------------------------- losses


def normalise_cams(cams: Tensor, mode: str = "sample") -> Tensor:
    """Min-max normalise CAMs (B, K, h, w) to [0, 1].

    ``"sample"`` (reference): one min and max per image over all K channels, so a weak
    concept stays weak. ``"channel"``: per image and concept.
    """
    dims = (1, 2, 3) if mode == "sample" else (2, 3)
    lo = cams.amin(dim=dims, keepdim=True)
    hi = cams.amax(dim=dims, keepdim=True)
    return (cams - lo) / (hi - lo).clamp_min(1e-12)


def pseudo_targets(cams_norm: Tensor, teacher_logits: Tensor | None = None, teacher_mix: float = 0.5) -> tuple[Tensor, Tensor]:
    """Soft scores and hard targets.

    cams_norm (B, K, h, w) in [0, 1]; teacher_logits (B, K, h, w) or None.
    Returns (scores (B, K, h, w), targets (B, h, w) int64 argmax over K).
    """
    scores = cams_norm
    if teacher_logits is not None:
        scores = teacher_mix * teacher_logits.softmax(dim=1) + (1 - teacher_mix) * cams_norm
    return scores, scores.argmax(dim=1)


def uncertainty_loss(logits: Tensor) -> Tensor:
    """Mean over pixels of 1 - (p_top1 - p_top2); logits (B, K, h, w); value in [0, 1]."""
    if logits.shape[1] < 2:
        return logits.new_zeros(())
    top2 = logits.softmax(dim=1).topk(2, dim=1).values
    return (1 - (top2[:, 0] - top2[:, 1])).mean()


def diversity_loss(class_embeddings: Tensor) -> Tensor:
    """Mean over samples and class pairs i < j of (1 + cos(e_i, e_j)).

    class_embeddings (B, K, d). 1 for orthogonal embeddings, 0 only if antipodal.
    """
    k = class_embeddings.shape[1]
    if k < 2:
        return class_embeddings.new_zeros(())
    e = F.normalize(class_embeddings.float(), dim=-1)
    sim = e @ e.transpose(1, 2)
    i, j = torch.triu_indices(k, k, offset=1, device=e.device)
    return (1 + sim[:, i, j]).mean()


# --------------------------------------------------------------------------- training


def _epoch_seed(seed: int, epoch: int) -> int:
    # Every epoch is seeded from (seed, epoch) alone, so a resumed run replays exactly.
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63 - 1)


def _make_optimizer(decoder: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in decoder.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def _state_copy(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def teacher_update(student: nn.Module, teacher: nn.Module, initial_state: dict[str, Tensor]) -> None:
    """teacher <- student, student <- its initial weights (in place)."""
    teacher.load_state_dict(student.state_dict())
    student.load_state_dict(initial_state)


def _backbone_identity(backbone: nn.Module) -> dict[str, Any]:
    return {
        "name": getattr(backbone, "name", None),
        "weights_id": getattr(backbone, "weights_id", None),
        "embed_dim": int(getattr(backbone, "embed_dim")),
        "patch_size": int(getattr(backbone, "patch_size")),
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LOG_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in LOG_COLUMNS})
    _atomic_write_bytes(path, buf.getvalue().encode())


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k))


class _Progress:
    """Per-epoch bar (img/s, time left) on a terminal via `runtime.progress`; the epoch
    summaries are printed either way, so logs get one line per epoch."""

    def __init__(self, enabled: bool, log_fn: Callable[[str], None] | None) -> None:
        self.enabled = enabled
        self.log_fn = log_fn
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int) -> None:
        self.bar = progress(total=total, desc=f"epoch {epoch + 1}/{epochs}", enabled=self.enabled)

    def step(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, msg: str) -> None:
        if self.log_fn is not None:
            self.log_fn(msg)
        elif self.enabled:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg)
            else:
                print(msg, flush=True)


def _loader(dataset: Dataset, config: TrainConfig, order: Tensor, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=order.tolist(),  # a fixed permutation drawn from the epoch's generator
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def _train_epoch(
    backbone: nn.Module,
    student: MaskTransformerDecoder,
    teacher: MaskTransformerDecoder | None,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    config: TrainConfig,
    alpha: float,
    generator: torch.Generator,
    device: torch.device,
    progress: _Progress,
) -> dict[str, float]:
    """One pass over the data; returns image-weighted means of the loss terms."""
    student.train()
    if teacher is not None:
        teacher.eval()
    patch_size = int(backbone.patch_size)
    sums = {"loss": 0.0, "ce": 0.0, "uncertainty": 0.0, "diversity": 0.0, "peer": 0.0}
    seen = 0
    for images, cams, _ in loader:
        images = images.to(device, non_blocking=True)
        cams = cams.to(device, non_blocking=True).float()
        with torch.no_grad():
            images, cams = augment_batch(images, cams, config, patch_size, generator)
        with autocast(device):
            with torch.no_grad():
                feats = backbone(images).patch
            logits, class_emb = student(feats, return_class_embeddings=True)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(feats).float()
        logits = logits.float()
        if cams.shape[-2:] != logits.shape[-2:]:  # backbone grid differs from the crop's patch grid
            cams = F.interpolate(cams, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        with torch.no_grad():
            scores, target = pseudo_targets(normalise_cams(cams, config.cam_norm), teacher_logits, config.teacher_mix)
        ce = F.cross_entropy(logits, target)
        unc = uncertainty_loss(logits)
        div = diversity_loss(class_emb)
        loss = ce + config.uncertainty_weight * unc + config.diversity_weight * div
        peer = logits.new_zeros(())
        if teacher is not None and alpha > 0:
            # Peer loss: push away from a target whose classes are randomly relabelled,
            # which penalises confident fitting of noise (one permutation per batch).
            perm = torch.randperm(scores.shape[1], generator=generator).to(device)
            peer = alpha * F.cross_entropy(logits, scores[:, perm].argmax(dim=1))
            loss = loss - peer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip_value > 0:
            nn.utils.clip_grad_value_(student.parameters(), config.grad_clip_value)
        optimizer.step()

        n = images.shape[0]
        seen += n
        for k, v in (("loss", loss), ("ce", ce), ("uncertainty", unc), ("diversity", div), ("peer", peer)):
            sums[k] += float(v.detach()) * n
        progress.step(n, float(loss.detach()))
    return {k: v / max(seen, 1) for k, v in sums.items()}


def train_segmenter(
    backbone: nn.Module,
    dataset: Dataset,
    num_classes: int,
    config: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    log_fn: Callable[[str], None] | None = None,
) -> Path:
    """Train the decoder on the dataset's CAMs; resumable; returns ``out_dir/model.pt``.

    Args:
        backbone: frozen Backbone (``forward(x) -> .patch (B, h, w, D)``, ``embed_dim``,
            ``patch_size``).
        dataset: a :class:`PseudoLabelDataset` (or anything yielding the same items).
        num_classes: K, the number of CAM channels / concepts.
        config: training constants.
        out_dir: receives ``last.pt`` (every epoch), ``train_log.csv`` (every epoch) and
            ``model.pt`` (at the end).
        progress: tqdm bar on a terminal, one line per epoch otherwise.
        log_fn: receives the per-epoch and event lines instead of stdout.

    ``model.pt`` holds the decoder selected by ``config.predict_with``: by default the
    student (what the reference evaluates); "teacher" falls back to the student when no
    teacher update happened. It is always the last epoch's weights (no label-based
    selection). A ``last.pt`` already in ``out_dir`` is resumed when its config matches
    (up to ``epochs``, ``num_workers``, ``device``, ``predict_with``); otherwise an
    :class:`InputError` names it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, model_path, log_path = out_dir / "last.pt", out_dir / "model.pt", out_dir / "train_log.csv"
    device = resolve_device(config.device)
    report = _Progress(progress, log_fn)
    identity = _backbone_identity(backbone)
    cfg_dict = config.to_dict()
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    cam_channels = dataset[0][1].shape[0]
    if cam_channels != num_classes:
        raise ValueError(f"the CAMs have {cam_channels} channels but num_classes={num_classes}")

    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)

    torch.manual_seed(config.seed)  # decoder initialisation
    student = MaskTransformerDecoder(
        identity["embed_dim"],
        num_classes,
        n_layers=config.decoder_layers,
        n_heads=config.decoder_heads,
        d_model=config.decoder_dim,
        dropout=config.decoder_dropout,
    ).to(device)
    decoder_args = student.config()
    teacher = MaskTransformerDecoder(**decoder_args).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    initial_state = _state_copy(student)
    optimizer = _make_optimizer(student, config)
    has_teacher = False
    start_epoch, since_update = 0, 0
    history: list[dict[str, Any]] = []

    if last_path.exists():
        ckpt = torch.load(last_path, map_location=device, weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(last_path, f"not a training checkpoint of this version (format {ckpt.get('format')!r})")
        problems = _config_differences(ckpt["config"], cfg_dict)
        if ckpt["decoder_args"] != decoder_args:
            problems.append(f"decoder: checkpoint {ckpt['decoder_args']} != now {decoder_args}")
        if ckpt["backbone"] != identity:
            problems.append(f"backbone: checkpoint {ckpt['backbone']} != now {identity}")
        if problems:
            raise InputError(
                last_path,
                "cannot resume, the checkpoint was written with other settings ("
                + "; ".join(problems)
                + "); delete it to start over",
            )
        if ckpt["epoch"] > config.epochs:
            raise InputError(last_path, f"checkpoint has {ckpt['epoch']} epochs done, more than epochs={config.epochs}")
        student.load_state_dict(ckpt["student"])
        initial_state = {k: v.to(device) for k, v in ckpt["initial"].items()}
        if ckpt["teacher"] is not None:
            teacher.load_state_dict(ckpt["teacher"])
            has_teacher = True
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, since_update, history = ckpt["epoch"], ckpt["since_update"], list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        report.message(f"resuming from {last_path} after epoch {start_epoch}/{config.epochs}")

    for epoch in range(start_epoch, config.epochs):
        tic = time.perf_counter()
        seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(seed)  # dropout, DataLoader worker seeds
        generator = torch.Generator().manual_seed(seed)
        updated = is_teacher_update_epoch(epoch, config)
        if updated:
            teacher_update(student, teacher, initial_state)
            has_teacher, since_update = True, 0
            if config.reset_optimizer:
                optimizer = _make_optimizer(student, config)
            report.message(f"epoch {epoch}: teacher <- student, student <- initial weights")
        else:
            since_update += 1
        bootstrapping = config.bootstrap and epoch >= config.bootstrap_start and has_teacher
        alpha = peer_alpha(since_update, config) if bootstrapping else 0.0

        order = torch.randperm(len(dataset), generator=generator)
        report.start(epoch, config.epochs, len(dataset))
        try:
            stats = _train_epoch(
                backbone,
                student,
                teacher if bootstrapping else None,
                optimizer,
                _loader(dataset, config, order, device),
                config,
                alpha,
                generator,
                device,
                report,
            )
        finally:
            report.end()
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"epoch {epoch}: loss is {stats['loss']}; stopping (last.pt keeps epoch {epoch})")
        row = {"epoch": epoch, **{k: round(v, 6) for k, v in stats.items()}, "alpha": alpha,
               "teacher_update": int(updated), "seconds": round(time.perf_counter() - tic, 3)}
        history.append(row)
        _atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "since_update": since_update,
                "student": student.state_dict(),
                "teacher": teacher.state_dict() if has_teacher else None,
                "initial": initial_state,
                "optimizer": optimizer.state_dict(),
                "decoder_args": decoder_args,
                "backbone": identity,
                "config": cfg_dict,
                "history": history,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                },
            },
            last_path,
        )
        _write_log(log_path, history)
        report.message(
            f"epoch {epoch + 1}/{config.epochs} loss {row['loss']:.4f} ce {row['ce']:.4f} "
            f"unc {row['uncertainty']:.4f} div {row['diversity']:.4f} peer {row['peer']:.4f} "
            f"({row['seconds']:.1f} s, {len(dataset) / max(row['seconds'], 1e-9):.1f} img/s)"
        )

    which = "teacher" if config.predict_with == "teacher" and has_teacher else "student"
    final = teacher if which == "teacher" else student
    _write_log(log_path, history)
    _atomic_torch_save(
        {
            "format": MODEL_FORMAT,
            "decoder": {k: v.detach().cpu() for k, v in final.state_dict().items()},
            "decoder_args": decoder_args,
            "which": which,
            "epochs": config.epochs,
            "backbone": identity,
            "config": cfg_dict,
        },
        model_path,
    )
    return model_path


# --------------------------------------------------------------------------- inference


def load_segmenter(backbone: nn.Module, path: str | Path, device: str | torch.device | None = None) -> Segmenter:
    """Rebuild the trained Segmenter from ``model.pt`` around ``backbone``; eval mode.

    Raises :class:`ProvenanceError` when the backbone is not the one it was trained on.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model file not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != MODEL_FORMAT:
        raise InputError(path, f"not a segmenter model file (format {ckpt.get('format')!r})")
    saved, now = ckpt["backbone"], _backbone_identity(backbone)
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
