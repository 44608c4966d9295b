"""The training set: images at the training size with their CAMs, and the decoded image cache
training reads them from.

Workers hand over what is stored (uint8 images, CAMs in their stored float dtype); the
conversion to float and the augmentation run batched on the training device
(:func:`pipeline.train.augment.augment_batch`).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from pipeline.errors import InputError
from pipeline.files import commit, fingerprint, partial_path, remove, write_json


class PseudoLabelDataset(Dataset):
    """Images with their CAMs.

    Args:
        read_image: index -> (H, W, 3) uint8, already at the training size.
        read_cam: index -> (K, h, w) float CAMs on the patch grid of that size.
        length: number of items.

    Items: (image uint8 (H, W, 3), cam (K, h, w) in the dtype read (float16 stays float16:
    half the bytes to the device), index).
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

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int] | "SampleFailure":
        try:
            return self._item(index)
        except InputError as exc:      # an unreadable image, a damaged CAM file: see SampleFailure
            return SampleFailure(exc.path, exc.problem)

    def _item(self, index: int) -> tuple[Tensor, Tensor, int]:
        img = np.asarray(self.read_image(index))
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {index}: expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
        cam = np.asarray(self.read_cam(index))
        if cam.ndim != 3 or not np.issubdtype(cam.dtype, np.floating):
            raise ValueError(f"cam {index}: expected float (K, h, w), got {cam.shape} {cam.dtype}")
        # np.require: a memory-mapped or PIL-backed array is read-only, torch.from_numpy warns
        return (torch.from_numpy(np.require(img, requirements=("C", "W"))),
                torch.from_numpy(np.require(cam, requirements=("C", "W"))), index)


class SampleFailure(NamedTuple):
    """An InputError met while reading a sample, handed over as the batch instead of raised: a
    DataLoader worker's exception reaches the main process as a RuntimeError holding the worker's
    traceback as text, where the CLI shows an InputError as its one line (path: problem).
    ``raise_if_failed`` raises it again in the main process."""

    path: str | None
    problem: str


def collate_samples(samples: list) -> Any:
    """DataLoader ``collate_fn``: the batch of ``samples``, or the first SampleFailure among them."""
    failure = next((sample for sample in samples if isinstance(sample, SampleFailure)), None)
    return failure if failure is not None else default_collate(samples)


def raise_if_failed(batch: Any) -> Any:
    """``batch`` as the loader gave it, or the InputError of a SampleFailure raised here."""
    if isinstance(batch, SampleFailure):
        raise InputError(batch.path, batch.problem)
    return batch


# ----------------------------------------------------------------------------- image cache
CACHE_FORMAT = "transfgu-train-images/1"


class ImageCache:
    """`cache(position) -> (H, W, 3) uint8`: the training images decoded once at the training
    size, in one memory-mapped ``.npy`` of shape (N, H, W, 3).

    Reading a row costs a copy of H x W x 3 bytes (about 50,000 images/s per core at 320x320)
    where decoding and resizing a 640x480 JPEG costs about 4 ms (``benchmarks/bench_loader.py``).
    The map is opened lazily in whichever process reads and is not pickled, so the cache can
    be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return int(self._open().shape[0])

    def _open(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __call__(self, position: int) -> np.ndarray:
        return np.array(self._open()[position])


def build_image_cache(path: Path, read: Callable[[int], np.ndarray], count: int, size: Sequence[int],
                      stamp: dict, *, workers: int = 4, log: Callable[[str], None] = print) -> ImageCache:
    """The cache at ``path`` for ``stamp`` (what its contents depend on), built when missing or
    stale.

    Args:
        path: the ``.npy`` file; ``<path>.json`` beside it holds the stamp's fingerprint.
        read: position -> (H, W, 3) uint8 at ``size`` (``manifest.image(indices[p], size)``:
            the numbers training would decode itself).
        count: N, the number of images.
        size: (H, W).
        stamp: JSON-able description of the inputs (image files with sizes and times, size).
        workers: decoding threads (PIL decodes and resizes without the GIL).

    Returns: the cache. Built under ``<path>.partial`` and renamed when complete, so an
    interrupted build never looks finished.
    """
    meta_path = path.with_suffix(".json")
    digest = fingerprint({"format": CACHE_FORMAT, **stamp})
    if path.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("fingerprint") == digest:
                return ImageCache(path)
        except (OSError, ValueError):
            pass
    height, width = int(size[0]), int(size[1])
    nbytes = count * height * width * 3
    log(f"train: decoding {count} images at {height}x{width} into {path} ({nbytes / 2**30:.2f} GiB), once")
    remove(meta_path)
    partial = partial_path(path)
    remove(partial)
    _decode_into(partial, read, count, (height, width), workers)
    # _decode_into has returned: its memmap is closed before the rename
    commit(partial, path)
    write_json(meta_path, {"fingerprint": digest, "shape": [count, height, width, 3]})
    return ImageCache(path)


def _decode_into(path: Path, read: Callable[[int], np.ndarray], count: int, size: tuple[int, int],
                 workers: int) -> None:
    """``read(position)`` for every position into a new (count, H, W, 3) uint8 .npy at ``path``,
    on ``workers`` threads; flushed when it returns."""
    height, width = size
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, height, width, 3))

    def put(position: int) -> None:
        img = read(position)
        if img.shape != (height, width, 3) or img.dtype != np.uint8:
            raise InputError(None, f"image {position} read as {img.shape} {img.dtype}, expected "
                                   f"({height}, {width}, 3) uint8")
        array[position] = img

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(put, range(count)):    # map re-raises a read error (an InputError naming the file)
            pass
    array.flush()
