"""The two big stores: the Zarr feature store and the HDF5 pseudo labels, with provenance checks.

Both are built under `<name>.partial` (pipeline.files) and renamed to `<name>` only when
complete, so an interrupted stage never leaves something that looks finished. The
partial artifact records which shards are done: rerunning the stage resumes it
instead of starting over, as long as its provenance (backbone, weights, params) is
the same.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import zarr

from pipeline.config import Config
from pipeline.errors import InputError, ProvenanceError
from pipeline.files import json_default, partial_path, remove


# ----------------------------------------------------------------------------- provenance
def check_provenance(path: str | Path, found: dict, expected: dict) -> None:
    """Refuse an input written with other settings than the ones this stage runs with.

    Only the keys of `expected` are compared, so a stage checks what it depends on.
    """
    mismatches = [
        f"{key}: artifact has {found.get(key)!r}, this run expects {value!r}"
        for key, value in expected.items()
        if _normalise(found.get(key)) != _normalise(value)
    ]
    if mismatches:
        raise ProvenanceError(
            f"{path}: written by another configuration; rerun the stage that makes it "
            f"(dvc repro) or change params.yaml back.\n  " + "\n  ".join(mismatches)
        )


def _normalise(value: Any) -> Any:
    """JSON round trip, so tuples and lists, numpy and python scalars compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=json_default))


# ----------------------------------------------------------------------------- shard bookkeeping
def shards(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Index ranges [start, stop) of at most `size` items covering 0..n."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


class ShardLog:
    """Marks completed shards of a partial artifact with one empty file each.

    One file per shard (not a shared index) so that independent workers writing
    disjoint shards never contend for the same file.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _marker(self, start: int, stop: int) -> Path:
        return self.folder / f"{start:09d}-{stop:09d}"

    def done(self, start: int, stop: int) -> bool:
        return self._marker(start, stop).exists()

    def mark(self, start: int, stop: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._marker(start, stop).touch()

    def clear(self) -> None:
        remove(self.folder)


# ----------------------------------------------------------------------------- features (Zarr)
FEATURE_ARRAYS = ("patch", "embedding", "saliency", "crops/embedding", "crops/box",
                  "crops/image", "crops/kind")
CROP_KINDS = {"none": 0, "thing": 1, "stuff": 2, "all": 3}


def create_feature_store(
    path: str | Path,
    *,
    n_images: int,
    grid: tuple[int, int],
    dim: int,
    n_crop_images: int,
    windows_per_image: int,
    attrs: dict,
) -> zarr.Group:
    """Empty Zarr v3 group for `n_images` images: one chunk per image along N.

    Crops take `windows_per_image` rows per image of the crop split, so that the rows
    of image j are [j * W, (j + 1) * W) and any shard of images writes its own chunks.
    """
    h, w = grid
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("patch", shape=(n_images, h, w, dim), chunks=(1, h, w, dim), dtype="float16")
    root.create_array("embedding", shape=(n_images, dim), chunks=(1, dim), dtype="float32")
    root.create_array("saliency", shape=(n_images, h, w), chunks=(1, h, w), dtype="float16")
    crops = root.create_group("crops")
    rows = n_crop_images * windows_per_image
    per = max(windows_per_image, 1)
    crops.create_array("embedding", shape=(rows, dim), chunks=(per, dim), dtype="float32", fill_value=0)
    crops.create_array("box", shape=(rows, 4), chunks=(per, 4), dtype="int32", fill_value=0)
    crops.create_array("image", shape=(rows,), chunks=(per,), dtype="int32", fill_value=-1)
    crops.create_array("kind", shape=(rows,), chunks=(per,), dtype="uint8", fill_value=0)
    root.attrs.update(attrs)
    return root


def open_features(path: str | Path, expected: dict | None = None) -> zarr.Group:
    """Open a complete feature store read-only, checking its provenance if asked."""
    path = Path(path)
    if not path.exists():
        hint = " (an interrupted run left a .partial: rerun the features stage to resume)" \
            if partial_path(path).exists() else ""
        raise InputError(path, f"feature store not found; run the features stage first{hint}")
    root = zarr.open_group(str(path), mode="r")
    if expected:
        check_provenance(path, dict(root.attrs), expected)
    return root


def open_features_of(config: Config) -> zarr.Group:
    """The feature store of `config`'s cache, checked to be made with its backbone, features
    params and crop split (what the stages that read it depend on)."""
    return open_features(config.path("features"), expected={
        "backbone": config.backbone.name, "params": asdict(config.features), "crop_split": config.data.train_split})


def features_as_dask(path: str | Path) -> dict:
    """The feature arrays as lazy dask arrays, keyed like the store ('crops/box', ...)."""
    import dask.array as da

    return {name: da.from_zarr(str(path), component=name) for name in FEATURE_ARRAYS}


# ----------------------------------------------------------------------------- pseudo labels (HDF5)
def create_pseudolabel_file(
    path: str | Path,
    *,
    image_ids: list[str],
    num_concepts: int,
    grid: tuple[int, int],
    attrs: dict,
) -> None:
    """HDF5 file with `cam` (N, K, h, w) float16 chunked per image, `label` (N, h, w) uint8,
    `image_id` (N,), and `done` (N,) bool, which lets an interrupted run resume."""
    h, w = grid
    n = len(image_ids)
    label_dtype = "uint8" if num_concepts < 255 else "uint16"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("cam", shape=(n, num_concepts, h, w), dtype="float16",
                              chunks=(1, num_concepts, h, w), compression="gzip", compression_opts=1)
        handle.create_dataset("label", shape=(n, h, w), dtype=label_dtype, chunks=(1, h, w))
        handle.create_dataset("image_id", data=np.array(image_ids, dtype=h5py.string_dtype()))
        handle.create_dataset("done", shape=(n,), dtype="bool", fillvalue=False)
        for key, value in attrs.items():
            handle.attrs[key] = json.dumps(value, default=json_default)


def read_h5_attrs(handle: h5py.File) -> dict:
    return {key: json.loads(value) for key, value in handle.attrs.items()}


def open_pseudolabels(path: str | Path, expected: dict | None = None) -> h5py.File:
    """Open complete pseudo labels read-only, checking provenance if asked."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "pseudo labels not found; run the pseudolabels stage first")
    handle = h5py.File(path, "r")
    if expected:
        check_provenance(path, read_h5_attrs(handle), expected)
    return handle


class CamReader:
    """`reader(position) -> cam (K, h, w) float32` of the image `indices[position]`.

    The HDF5 handle is opened lazily in whichever process reads, and is not pickled, so
    the reader can be handed to DataLoader workers (h5py handles must not cross a fork).
    """

    def __init__(self, path: str | Path, indices: list[int] | np.ndarray) -> None:
        self.path = str(path)
        self.indices = np.asarray(indices)
        self._handle: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def __len__(self) -> int:
        return len(self.indices)

    def __call__(self, position: int) -> np.ndarray:
        if self._handle is None:
            self._handle = h5py.File(self.path, "r")
        return self._handle["cam"][int(self.indices[position])].astype(np.float32)
