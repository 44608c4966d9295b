"""Reading, converting and resizing images and label maps.

Every image leaves this module as ``np.uint8`` ``(H, W, 3)`` RGB and every label map
as ``np.uint8`` ``(H, W)`` class ids with 255 = ignore, whatever the file stored.
Any file that cannot be read that way raises :class:`~pipeline.errors.InputError`
naming the file, so a bad image among 100k is found by name, not by a stack trace.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import InputError

if TYPE_CHECKING:  # torch is imported only where tensors are made
    import torch

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IGNORE_INDEX = 255

# Errors PIL raises for files it cannot identify or decode (truncated data is an OSError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a directory, expected an image file")


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` with PIL; any failure is an InputError naming the file.

    ``Image.open`` only parses the header; ``load()`` is what notices a truncated or
    corrupt body, so it is called here rather than left to the first pixel access.
    """
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except UnidentifiedImageError:
        raise InputError(path, "not an image file (PIL cannot identify its format)") from None
    except Image.DecompressionBombWarning as err:
        raise InputError(path, f"image too large to decode safely: {err}") from None
    except _PIL_ERRORS as err:
        raise InputError(path, f"unreadable or truncated image: {err}") from None
    return img


def read_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file header only; cheap enough for 100k files."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise InputError(path, "not an image file (PIL cannot identify its format)") from None
    except _PIL_ERRORS as err:
        raise InputError(path, f"unreadable image header: {err}") from None
    return int(height), int(width)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer/float array of any depth to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64))
        # Float images are either 0..1 (common for TIFF/EXR exports) or already 0..255.
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    top = int(a.max()) if a.size else 0
    # 16-bit PNGs arrive as I;16 or I (int32); both use the 0..65535 range.
    full = 65535 if top <= 65535 else top
    return np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to ``(H, W, 3)`` uint8 RGB (alpha is dropped, not composited)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def load_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as ``(H, W, 3)`` uint8 RGB.

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit files are converted;
    unreadable, truncated or non-image files raise InputError naming the file.
    """
    img = open_image(path)
    try:
        return pil_to_rgb(img)
    except _PIL_ERRORS as err:
        raise InputError(path, f"cannot convert image mode {img.mode} to RGB: {err}") from None


def read_label_array(path: str | Path) -> tuple[np.ndarray, str]:
    """The raw label values of ``path`` and its PIL mode.

    Palette (``P``) files yield their indices, not the palette colours: that is how
    VOC and COCO-Stuff store class ids.
    """
    img = open_image(path)
    return np.asarray(img), img.mode


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (PIL) of a uint8 ``(H, W, 3)`` or ``(H, W)`` image to ``size = (H, W)``."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"resize_image expects uint8, got {img.dtype}")
    height, width = int(size[0]), int(size[1])
    if img.shape[:2] == (height, width):
        return img.copy()
    out = Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(out)


def resize_label(lbl: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (PIL) of a uint8 ``(H, W)`` label map to ``size = (H, W)``."""
    lbl = np.asarray(lbl)
    if lbl.dtype != np.uint8 or lbl.ndim != 2:
        raise TypeError(f"resize_label expects a (H, W) uint8 array, got {lbl.dtype} {lbl.shape}")
    height, width = int(size[0]), int(size[1])
    if lbl.shape == (height, width):
        return lbl.copy()
    out = Image.fromarray(lbl).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(out)


def images_to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 images (H, W, 3), one or a list of equal size -> float32 (B, 3, H, W) in [0, 1],
    the layout every backbone takes."""
    return to_float_images(stack_images(images))


def stack_images(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 images (H, W, 3), one or a list of equal size -> uint8 tensor (B, H, W, 3): what
    goes to the device (a quarter of float32's bytes), made float there by to_float_images."""
    import torch

    batch = np.stack(images) if isinstance(images, list) else np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    # np.require: PIL-backed arrays are read-only, which torch.from_numpy warns about
    return torch.from_numpy(np.require(batch, requirements=("C", "W")))


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1] (x / 255, correctly rounded on any
    device, so the same numbers on the CPU and the GPU); a float (B, 3, H, W) batch is returned
    as it is."""
    if images.is_floating_point():
        return images
    return images.permute(0, 3, 1, 2).float().div_(255.0)
