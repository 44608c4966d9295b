"""The two big stores: the Zarr feature store and the HDF5 pseudo labels, with provenance checks.

Both are built under `<name>.partial` (pipeline.files) and renamed to `<name>` only when
complete, so an interrupted stage never leaves something that looks finished. The
partial artifact records which shards are done: rerunning the stage resumes it
instead of starting over, as long as its provenance (backbone, weights, params) is
the same.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import h5py
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.config import Config
from pipeline.errors import InputError, ProvenanceError
from pipeline.files import fingerprint, json_default, partial_path, remove

if TYPE_CHECKING:
    from pipeline.backbones import Backbone
    from pipeline.concepts import Concepts
    from pipeline.data import Manifest


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


# Every feature array is chunked along N only, and stored so that an absent chunk file always
# means damage: zarr skips a chunk equal to the fill value unless `write_empty_chunks` is set
# (and then reads the fill value back, silently). Flat chunk keys ('c.12.0.0.0', one folder per
# array) let verify_feature_store list a store of 100k images in milliseconds, where nested
# keys cost one folder read per image and array. Zstd checksums turn a flipped bit into a read
# error instead of wrong numbers.
_ARRAY_OPTIONS = {"chunk_key_encoding": {"name": "default", "separator": "."},
                  "compressors": ZstdCodec(level=0, checksum=True),
                  "config": {"write_empty_chunks": True}}


def writing_every_chunk():
    """Context manager under which the arrays opened (and written) store every chunk, one equal
    to the fill value included. `write_empty_chunks` is a setting of the opened array, not saved
    in the store, so every writer of a feature store must open its arrays under it."""
    return zarr.config.set({"array.write_empty_chunks": True})


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
    Write it under `writing_every_chunk()` (arrays reopened through the group forget it).
    """
    h, w = grid
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    opts = _ARRAY_OPTIONS
    root.create_array("patch", shape=(n_images, h, w, dim), chunks=(1, h, w, dim), dtype="float16", **opts)
    root.create_array("embedding", shape=(n_images, dim), chunks=(1, dim), dtype="float32", **opts)
    root.create_array("saliency", shape=(n_images, h, w), chunks=(1, h, w), dtype="float16", **opts)
    crops = root.create_group("crops")
    rows = n_crop_images * windows_per_image
    per = max(windows_per_image, 1)
    crops.create_array("embedding", shape=(rows, dim), chunks=(per, dim), dtype="float32", fill_value=0, **opts)
    crops.create_array("box", shape=(rows, 4), chunks=(per, 4), dtype="int32", fill_value=0, **opts)
    crops.create_array("image", shape=(rows,), chunks=(per,), dtype="int32", fill_value=-1, **opts)
    crops.create_array("kind", shape=(rows,), chunks=(per,), dtype="uint8", fill_value=0, **opts)
    root.attrs.update(attrs)
    return root


def open_features(path: str | Path, expected: dict | None = None, *, verify: bool = False) -> zarr.Group:
    """Open a complete feature store read-only, checking its provenance if asked.

    Args:
        path: the store folder (cache/features.zarr).
        expected: attributes the store must have (check_provenance), None for no check.
        verify: also check that every chunk file is there (verify_feature_store: one listing
            of the folder), as the stages do.
    Returns:
        The root group; read its arrays with read_rows to turn a damaged chunk into an InputError.
    """
    path = Path(path)
    if not path.exists():
        hint = " (an interrupted run left a .partial: rerun the features stage to resume)" \
            if partial_path(path).exists() else ""
        raise InputError(path, f"feature store not found; run the features stage first{hint}")
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise InputError(path, f"not a readable Zarr group ({type(exc).__name__}: {exc}); "
                         f"{_feature_repair(path)}") from None
    if expected:
        check_provenance(path, dict(root.attrs), expected)
    if verify:
        verify_feature_store(path, root)
    return root


def open_features_of(config: Config) -> zarr.Group:
    """The feature store of `config`'s cache, checked to be made with its backbone, features
    params and crop split (what the stages that read it depend on) and to have every chunk."""
    return open_features(config.path("features"), expected={
        "backbone": config.backbone.name, "params": asdict(config.features), "crop_split": config.data.train_split},
        verify=True)


def _feature_repair(path: Path) -> str:
    # --force: dvc checkout will not replace a modified output without it
    return f"restore it: dvc checkout --force {path}, or rerun the features stage: dvc repro -f -s features"


def _chunk_rows(array: zarr.Array, chunk: int) -> str:
    """'row 7' or 'rows 8..15': the rows along N that chunk `chunk` holds."""
    size = array.chunks[0]
    start, stop = chunk * size, min((chunk + 1) * size, array.shape[0])
    return f"row {start}" if stop - start == 1 else f"rows {start}..{stop - 1}"


def _chunk_names(array: zarr.Array, chunks: Sequence[int], total: int, shown: int = 3) -> str:
    """'c.3.0 (rows 6..7), c.5.0 (rows 10..11), ... (5 in all)' for chunk indices along N."""
    names = [f"{array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))} ({_chunk_rows(array, c)})"
             for c in chunks[:shown]]
    return ", ".join(names) + (f", ... ({total} in all)" if total > len(names) else "")


def _stored_files(path: Path) -> set[str]:
    """Every file under `path`, as '/'-separated paths relative to it (one directory walk)."""
    files = set()
    for folder, _, names in os.walk(path):
        relative = Path(folder).relative_to(path).as_posix()
        prefix = "" if relative == "." else relative + "/"
        files.update(prefix + name for name in names)
    return files


def verify_feature_store(path: str | Path, root: zarr.Group | None = None) -> None:
    """Refuse a feature store with an array or chunk file missing (zarr would read zeros).

    Every chunk is written, even one equal to the fill value (create_feature_store), so an
    absent chunk file is damage: a deleted file, an incomplete checkout or copy. The
    expected chunk keys of each array of FEATURE_ARRAYS are compared with one listing of
    the folder: no per-chunk calls, so it stays cheap at 100k+ chunk files.

    Args:
        path: the store folder.
        root: the store opened at `path`, if it already is.
    Raises:
        InputError: naming each damaged array, a few of its missing chunks and how many, and
            the fix.
    """
    path = Path(path)
    root = zarr.open_group(str(path), mode="r") if root is None else root
    present = _stored_files(path)
    problems = []
    for name in FEATURE_ARRAYS:
        try:
            array = root[name]
        except KeyError:
            problems.append(f"array '{name}' is missing")
            continue
        grid = list(product(*(range(n) for n in array.cdata_shape)))
        missing = [coords[0] for coords in grid
                   if f"{name}/{array.metadata.encode_chunk_key(coords)}" not in present]
        if missing:
            problems.append(f"array '{name}' lacks {len(missing)} of its {len(grid)} chunk files: "
                            f"{_chunk_names(array, missing, len(missing))}")
    if problems:
        raise InputError(path, "damaged feature store (a missing chunk would be read as zeros): "
                         + "; ".join(problems) + f"; {_feature_repair(path)}")


def _store_folder(store: zarr.Group) -> Path:
    """The folder of an opened group, for messages."""
    root = getattr(store.store, "root", None)
    return Path(root) / store.path if root is not None else Path(str(store.store))


def read_rows(store: zarr.Group, name: str, rows: int | slice | np.ndarray = slice(None)) -> np.ndarray:
    """Rows of a feature array, with a damaged chunk reported as an InputError, not a zarr traceback.

    Args:
        store: an open feature store (open_features / open_features_of).
        name: an array of FEATURE_ARRAYS, e.g. 'patch' or 'crops/embedding'.
        rows: along N: an index, a slice, or an integer array (any order; orthogonal selection).
    Returns:
        The selected rows with every other axis whole: read_rows(store, 'patch', i) is (h, w, D)
        float16, read_rows(store, 'crops/embedding', idx) is (len(idx), D) float32.
    Raises:
        InputError: the store folder, the array, the damaged chunk(s) with their rows, and the fix.
    """
    array = store[name]
    if not isinstance(rows, (int, np.integer, slice)):
        rows = np.asarray(rows)
    try:
        if isinstance(rows, np.ndarray):
            return array.get_orthogonal_selection((rows,) + (slice(None),) * (array.ndim - 1))
        return array[rows]
    except (IndexError, TypeError):
        raise                                   # a bad selection: the caller's bug, not damage
    except Exception as exc:  # noqa: BLE001 - codecs raise RuntimeError, ValueError, ...: told apart below
        damaged = _damaged_chunks(array, rows)
        if not damaged:
            raise                               # every chunk reads alone: not damage (memory, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        path = _store_folder(store)
        raise InputError(path, f"array '{name}': chunk{'s' if len(damaged) > 1 else ''} "
                         f"{_chunk_names(array, damaged, len(damaged))} "
                         f"cannot be decoded ({type(exc).__name__}: {first}); the store is damaged; "
                         f"{_feature_repair(path)}") from None


def _damaged_chunks(array: zarr.Array, rows: int | slice | np.ndarray, limit: int = 3) -> list[int]:
    """The first `limit` chunks along N of the selection `rows` that fail to read on their own."""
    size, n = array.chunks[0], array.shape[0]
    damaged = []
    for chunk in np.unique(np.atleast_1d(np.arange(n)[rows]) // size):
        try:
            array[int(chunk) * size:min((int(chunk) + 1) * size, n)]
        except Exception:  # noqa: BLE001 - whatever the codec raises, this chunk is unreadable
            damaged.append(int(chunk))
            if len(damaged) == limit:
                break
    return damaged


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
    cam_dtype: str = "float16",
) -> None:
    """HDF5 file with `cam` (N, K, h, w) of `cam_dtype` (float16 | float32, recorded in the
    attribute `cam_dtype`) chunked per image, `label` (N, h, w) uint8, `image_id` (N,), and
    `done` (N,) bool, which lets an interrupted run resume."""
    if cam_dtype not in ("float16", "float32"):
        raise ValueError(f"cam_dtype must be float16 or float32, got {cam_dtype!r}")
    h, w = grid
    n = len(image_ids)
    label_dtype = "uint8" if num_concepts < 255 else "uint16"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("cam", shape=(n, num_concepts, h, w), dtype=cam_dtype,
                              chunks=(1, num_concepts, h, w), compression="gzip", compression_opts=1)
        handle.create_dataset("label", shape=(n, h, w), dtype=label_dtype, chunks=(1, h, w))
        handle.create_dataset("image_id", data=np.array(image_ids, dtype=h5py.string_dtype()))
        handle.create_dataset("done", shape=(n,), dtype="bool", fillvalue=False)
        for key, value in {**attrs, "cam_dtype": cam_dtype}.items():
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
        try:
            check_provenance(path, read_h5_attrs(handle), expected)
        except ProvenanceError:
            handle.close()
            raise
    return handle


def pseudolabel_provenance(backbone: "Backbone", concepts: "Concepts", image_ids: Sequence[str], *,
                           image_size: tuple[int, int], background: bool) -> dict:
    """What pseudo labels depend on: recorded in pseudolabels.h5 by its writer, and checked by
    every reader (open_pseudolabels_of), so that both sides compute it the same way.

    Args:
        backbone: computes the CAMs: name, weights_id, patch_size.
        concepts: the concepts the CAMs are of: centroids (K, D), pools (K,).
        image_ids: the manifest's image ids, in manifest order (N,).
        image_size: (H, W) the images are resized to.
        background: whether a background channel follows the K concept channels.
    Returns:
        {backbone, weights_id, images_hash, image_size [H, W], grid [h, w] = image_size // patch,
        num_concepts (K [+1]), concepts_hash, concept_pools (K [+1],)}.
    """
    h, w = (int(v) for v in image_size)
    return {"backbone": backbone.name, "weights_id": backbone.weights_id,
            "images_hash": fingerprint(list(image_ids)), "image_size": [h, w],
            "grid": [h // backbone.patch_size, w // backbone.patch_size],
            "num_concepts": concepts.k + int(background), "concepts_hash": concepts.fingerprint(),
            "concept_pools": list(concepts.pools) + (["background"] if background else [])}


def open_pseudolabels_of(config: Config, backbone: "Backbone", concepts: "Concepts",
                         manifest: "Manifest") -> h5py.File:
    """The pseudo labels of `config`'s cache, checked to be made by `backbone` (name, weights)
    for the manifest's images at the training size, from `concepts` (same K and centroids).

    Args:
        config: where the file is and the training size, pseudolabels.background.
        backbone: the stage's backbone (backbone_from_config(config.backbone)).
        concepts: Concepts.load(config.path("concepts")).
        manifest: Manifest.load(config.path("manifest")).
    Returns:
        The open file (close it, or use it in a `with`): cam (N, K[+1], h, w), label (N, h, w).
    Raises:
        ProvenanceError: naming the file and each field that differs; InputError when absent.
    """
    return open_pseudolabels(config.path("pseudolabels"), pseudolabel_provenance(
        backbone, concepts, [record.id for record in manifest.records], image_size=config.image_size,
        background=config.pseudolabels.background))


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
