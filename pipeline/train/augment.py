"""Training augmentation of a batch, on the batch's device: photometric changes, then one
random crop cut from the image and its CAMs alike (so they stay aligned), then a flip.

Every random draw comes from the CPU generator passed in, so a run (and a resumed run)
replays exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
# torchvision's own HSV conversions (the maths of its ColorJitter hue), applied to a whole batch
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from pipeline.config import TrainConfig
from pipeline.data.images import to_float_images
from pipeline.runtime import to_device


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def sample_crop_boxes(n: int, size: tuple[int, int], scale: tuple[float, float], generator: torch.Generator,
                      step: float | None = None) -> Tensor:
    """Random crop boxes, one per sample.

    The box side is ``s x`` the image side (image aspect kept), placed uniformly inside the
    image. ``step=None``: ``s ~ U(scale)``, boxes in continuous pixel coordinates. ``step``
    given: the reference's (segmenter_*.py data_augment, ``randint(4, 10) / 10``): ``s`` one of
    scale[0], scale[0] + step, ..., scale[1], the box size and corner truncated to whole pixels.

    Returns: (n, 4) float32 boxes ``(x0, y0, x1, y1)`` in pixel units (pixel i spans [i, i+1)).
    """
    height, width = size
    if step is None:
        s = _uniform(n, scale[0], scale[1], generator)
        bh, bw = s * height, s * width
        y0 = torch.rand(n, generator=generator) * (height - bh)
        x0 = torch.rand(n, generator=generator) * (width - bw)
    else:
        steps = int(round((scale[1] - scale[0]) / step))
        s = scale[0] + step * torch.randint(0, steps + 1, (n,), generator=generator).float()
        bh, bw = (s * height).floor(), (s * width).floor()
        y0 = (torch.rand(n, generator=generator) * (height - bh)).floor()
        x0 = (torch.rand(n, generator=generator) * (width - bw)).floor()
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
    boxes = boxes.to(dtype=torch.float32)
    batch_idx = torch.arange(b, device=boxes.device, dtype=torch.float32)[:, None]
    # Separate x / y scales: roi_align has one spatial_scale, CAM grids need not be square.
    cam_scale = torch.tensor([w / width, h / height, w / width, h / height], device=boxes.device)
    # both sets of boxes made where they were drawn (the CPU) and moved in one copy
    rois = to_device(torch.stack([torch.cat([batch_idx, boxes], dim=1),
                                  torch.cat([batch_idx, boxes * cam_scale], dim=1)]), images.device)
    img_rois, cam_rois = rois[0], rois[1]
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
    k1d = torch.exp(-0.5 * (r[None] / to_device(sigma, x.device).to(x.dtype)[:, None]) ** 2)
    k1d = (k1d / k1d.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1d[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k1d[:, None, None, :], groups=n * c)
    return y.reshape(n, c, height, width)


def adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (HSV, hue shifted by ``hue`` turns) with one factor per
    sample, in one batched pass: a Python loop over samples costs one set of kernel launches per
    image on a GPU. x (N, 3, H, W) in [0, 1], hue (N,) in [-0.5, 0.5] -> (N, 3, H, W)."""
    hsv = _rgb_to_hsv(x)
    hsv[:, 0].add_(hue.to(hsv)[:, None, None]).remainder_(1.0)
    return _hsv_to_rgb(hsv)


def photometric_augment(images: Tensor, config: TrainConfig, generator: torch.Generator,
                        total: int | None = None, offset: int = 0) -> Tensor:
    """Colour jitter, grayscale and blur, each drawn per sample.

    images (B, 3, H, W) in [0, 1] -> same shape. Jitter factors are drawn per sample
    like torchvision's ``ColorJitter`` (brightness/contrast/saturation in
    [1-s, 1+s], hue in [-s, s]); one random order of the four ops per batch. The
    reference draws each "apply?" once per batch; per-sample draws give the same rate.
    ``total``/``offset``: the draws are made for ``total`` samples (default B) and samples
    [offset, offset + B) of them used, so a process holding one part of a global batch
    augments its part exactly as one process holding the whole batch would.
    """
    b = images.shape[0]
    n = b if total is None else int(total)
    part = slice(offset, offset + b)
    out = images
    jit = (torch.rand(n, generator=generator) < config.jitter_p)[part]
    gray = (torch.rand(n, generator=generator) < config.grayscale_p)[part]
    blur = (torch.rand(n, generator=generator) < config.blur_p)[part]
    bs, cs, ss, hs = config.jitter_strength
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1 - bs), 1 + bs, generator),
            _uniform(n, max(0.0, 1 - cs), 1 + cs, generator),
            _uniform(n, max(0.0, 1 - ss), 1 + ss, generator),
            _uniform(n, -hs, hs, generator),
        ],
        dim=1,
    )[part]
    order = torch.randperm(4, generator=generator).tolist()
    sigma = _uniform(n, config.blur_sigma[0], config.blur_sigma[1], generator)[part]

    # The masks live on the CPU (drawn from the CPU generator): any() costs no device sync.
    if jit.any():
        idx = jit.nonzero().squeeze(1)
        on_device = to_device(idx, out.device)
        x = out[on_device]
        f = to_device(factors[idx], x.device).to(x.dtype)[:, :, None, None, None]
        for op in order:
            if op == 0:
                x = (x * f[:, 0]).clamp_(0, 1)
            elif op == 1:
                x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f[:, 1])
            elif op == 2:
                x = _blend(x, _gray(x), f[:, 2])
            else:
                x = adjust_hue(x, f[:, 3, 0, 0, 0])
        out = out.clone()
        out[on_device] = x
    if gray.any():
        idx = to_device(gray.nonzero().squeeze(1), out.device)
        out = out.clone() if out is images else out
        out[idx] = _gray(out[idx]).expand(-1, 3, -1, -1)
    if blur.any():
        idx = blur.nonzero().squeeze(1)
        on_device = to_device(idx, out.device)
        out = out.clone() if out is images else out
        out[on_device] = _gaussian_blur(out[on_device], sigma[idx], config.blur_kernel)
    return out


def augment_batch(
    images: Tensor,
    cams: Tensor,
    config: TrainConfig,
    patch_size: int,
    generator: torch.Generator,
    total: int | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Full training augmentation of a batch, on the batch's device.

    Args:
        images: (B, 3, H, W) float in [0, 1], or uint8 (B, H, W, 3) as the loader delivers
            them (converted here, on the device: a quarter of the bytes cross from the host).
        cams: (B, K, h, w) on the training size's patch grid, any float dtype.
        patch_size: backbone output stride; the crop size is rounded to a multiple of it.
        generator: CPU generator all random draws come from (reproducible, resumable).
        total, offset: this batch is samples [offset, offset + B) of a global batch of
            ``total`` (default B): one process of a distributed run draws what one process
            would draw for the whole batch and uses its part.

    Returns: images (B, 3, H', W') float32, cams (B, K, H'/p, W'/p) float32 with
    H' ~= crop_output_fraction x H.
    """
    images = to_float_images(images)
    b, _, height, width = images.shape
    n = b if total is None else int(total)
    part = slice(offset, offset + b)
    out_h = max(patch_size, int(round(height * config.crop_output_fraction / patch_size)) * patch_size)
    out_w = max(patch_size, int(round(width * config.crop_output_fraction / patch_size)) * patch_size)
    images = photometric_augment(images, config, generator, n, offset)
    boxes = sample_crop_boxes(n, (height, width), config.crop_scale, generator, config.crop_scale_step)[part]
    images, cams = crop_and_resize(images, cams, boxes, (out_h, out_w), (out_h // patch_size, out_w // patch_size))
    if config.hflip:
        flip = to_device((torch.rand(n, generator=generator) < 0.5)[part], images.device)[:, None, None, None]
        images = torch.where(flip, images.flip(-1), images)
        cams = torch.where(flip, cams.flip(-1), cams)
    return images, cams

