"""The training set: images at the training size with their CAMs."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.data.images import images_to_tensor


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
