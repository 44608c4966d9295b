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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import h5py
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

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
CROP_KINDS = {"none": 0, "thing": 1, "stuff": 2, "all": 3}
NOT_STORED_KIND = 255       # crops/kind of an image without crops (not of the crop split)


@dataclass(frozen=True)
class FeatureArray:
    """One array of the feature store: `rows_per_image` rows of `row_shape` per manifest image.

    Every array is indexed by manifest image (rows [i * r, (i + 1) * r) are image i's), but
    holds only the images of its `images` set ("all", "eval": the evaluation split, "crops":
    the crop split); the rows of the others are never written and cost nothing on disk.
    """

    name: str
    rows_per_image: int
    row_shape: tuple[int, ...]
    dtype: str
    images: str                 # all | eval | crops
    description: str

    @property
    def fill_value(self) -> float | int:
        # NaN (255 for kinds) is never a computed value, so a row read back as fill was never written
        return NOT_STORED_KIND if self.dtype == "uint8" else float("nan")

    def shape(self, n_images: int) -> tuple[int, ...]:
        return (n_images * self.rows_per_image, *self.row_shape)

    def row_bytes(self) -> int:
        """Bytes of one image's block (its inner chunk)."""
        return self.rows_per_image * int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def feature_arrays(grid: tuple[int, int], dim: int, windows_per_image: int,
                   samples_per_image: int) -> dict[str, FeatureArray]:
    """The arrays of a feature store, with what each holds: the one description of its layout,
    used to create it (create_feature_store), verify it and plan its size (pipeline.plan).

    Args:
        grid: (h, w) patch grid at the training size.
        dim: D, the backbone's embedding size.
        windows_per_image: W crop windows per image of the crop split (features.FeatureLayout).
        samples_per_image: S patch vectors kept per image of the crop split for the bottom-up
            baseline (samples_per_image()).
    """
    h, w = grid
    arrays = [
        FeatureArray("embedding", 1, (dim,), "float32", "all", "global embedding (N, D)"),
        FeatureArray("saliency", 1, (h, w), "float16", "all", "saliency map (N, h, w)"),
        FeatureArray("patch", 1, (h, w, dim), "float16", "eval",
                     "patch features (N, h, w, D), evaluation split only"),
        FeatureArray("patch_sample", samples_per_image, (dim,), "float16", "crops",
                     "patch vectors sampled for the bottom-up baseline (N * S, D), crop split only"),
        FeatureArray("crops/embedding", windows_per_image, (dim,), "float16", "crops",
                     "crop embeddings (N * W, D), zeros for windows of no pool in use"),
        FeatureArray("crops/kind", windows_per_image, (), "uint8", "crops",
                     "crop kind (N * W,): CROP_KINDS codes"),
    ]
    return {a.name: a for a in arrays}


FEATURE_ARRAYS = tuple(feature_arrays((1, 1), 1, 1, 1))


def samples_per_image(total: int, n_images: int, grid: tuple[int, int]) -> int:
    """Bottom-up sample per image of the crop split: `total` (features.bottom_up_samples)
    spread evenly, rounded up (at least `total` in all: 2 per image for 200,000 over COCO's
    118,287, where rounding down would give 118,287), at most every patch."""
    return max(1, min(grid[0] * grid[1], -(-total // max(n_images, 1))))


def image_members(manifest_splits: Sequence[str], eval_split: str, crop_split: str) -> dict[str, np.ndarray]:
    """Manifest indices of each `FeatureArray.images` set, from the split of every image."""
    splits = np.asarray(list(manifest_splits), dtype=object)
    return {"all": np.arange(len(splits)), "eval": np.flatnonzero(splits == eval_split),
            "crops": np.flatnonzero(splits == crop_split)}


def stored_shards(members: np.ndarray, shard_images: int) -> list[int]:
    """Shard indices along N that hold at least one of `members` (manifest indices): the shard
    files such an array has, since a shard of unwritten rows is never written."""
    return sorted({int(i) // shard_images for i in members})


# A feature store is sharded (zarr v3 sharding): one file holds `shard_images` images of one
# array, so the files grow in large steps (about 500 per array for COCO's 123k images at 256
# per shard), each image is one inner chunk readable on its own (one byte-range read), and a
# shard is the unit of work, written once, by the one task that computed it. Uncompressed
# (float features barely compress) with a CRC32C per chunk: a flipped bit is a read error,
# not a wrong number, and a store's size is known in advance (pipeline.plan).
_ARRAY_OPTIONS = {"chunk_key_encoding": {"name": "default", "separator": "."},
                  "serializer": BytesCodec(), "compressors": Crc32cCodec(), "filters": None}


def create_feature_store(
    path: str | Path,
    *,
    n_images: int,
    grid: tuple[int, int],
    dim: int,
    windows_per_image: int,
    attrs: dict,
    members: dict[str, np.ndarray] | None = None,
    samples_per_image: int = 1,
    shard_images: int = 1,
) -> zarr.Group:
    """Empty Zarr v3 group for `n_images` images (feature_arrays: one inner chunk per image,
    one shard per `shard_images` images).

    Args:
        members: manifest indices of each image set ("all", "eval", "crops"; image_members);
            None: every image in every set. Recorded as the shards each array must have
            (attrs["shards"]), which verify_feature_store checks.
        shard_images: images per shard, the unit a task writes at once (write_feature_shard).
    """
    members = members or {key: np.arange(n_images) for key in ("all", "eval", "crops")}
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    shards = {}
    for spec in feature_arrays(grid, dim, windows_per_image, samples_per_image).values():
        per = max(spec.rows_per_image, 1)
        root.create_array(spec.name, shape=spec.shape(n_images), chunks=(per, *spec.row_shape),
                          shards=(per * shard_images, *spec.row_shape), dtype=spec.dtype,
                          fill_value=spec.fill_value, **_ARRAY_OPTIONS)
        shards[spec.name] = stored_shards(members[spec.images], shard_images) if spec.rows_per_image else []
    root.attrs.update({**attrs, "shard_images": shard_images, "windows_per_image": windows_per_image,
                       "samples_per_image": samples_per_image, "shards": shards})
    return root


def open_features(path: str | Path, expected: dict | None = None, *, verify: bool = False) -> zarr.Group:
    """Open a complete feature store read-only, checking its provenance if asked.

    Args:
        path: the store folder (cache/features.zarr).
        expected: attributes the store must have (check_provenance), None for no check.
        verify: also check that every shard file it records is there (verify_feature_store: one listing
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
                         f"{_repair(path, 'features')}") from None
    if expected:
        check_provenance(path, dict(root.attrs), expected)
    if verify:
        verify_feature_store(path, root)
    return root


def open_features_of(config: Config) -> zarr.Group:
    """The feature store of `config`'s cache, checked to be made with its backbone, features
    params, crop and evaluation splits (what the stages that read it depend on) and to have every
    shard it records."""
    return open_features(config.path("features"), expected={
        "backbone": config.backbone.name, "params": asdict(config.features), "crop_split": config.data.train_split,
        "eval_split": config.data.eval_split},
        verify=True)


def _repair(path: Path, stage: str, damaged: Sequence[Path] = ()) -> str:
    """How to repair the artifact at `path`, written by `stage`. A file whose bytes are damaged
    may be hard-linked into DVC's cache (.dvc/config: outputs are linked, not copied), in which
    case DVC's copy is the same damaged file: `dvc checkout` would restore the damage, and the
    object must go first."""
    linked = [obj for obj in (_dvc_cache_object(f) for f in damaged) if obj is not None]
    if linked:
        return (f"DVC's cached copy is the same damaged file (a hard link): rm -f {' '.join(map(str, linked))} "
                f"&& dvc repro -f -s {stage} && dvc checkout --relink {path}")
    # --force: dvc checkout will not replace a modified output without it
    return f"restore it: dvc checkout --force {path}, or rerun the {stage} stage: dvc repro -f -s {stage}"


def _dvc_cache_object(file: Path) -> Path | None:
    """The object of the DVC cache (.dvc/cache of the first project above `file`) that is the same
    file as `file` (a hard link to it), or None."""
    try:
        stat = file.stat()
    except OSError:
        return None
    if stat.st_nlink < 2:
        return None
    for folder in file.resolve().parents:
        cache = folder / ".dvc" / "cache"
        if cache.is_dir():
            for root, _, names in os.walk(cache):
                for name in names:
                    candidate = Path(root) / name
                    try:
                        if os.path.samestat(candidate.stat(), stat):
                            return candidate
                    except OSError:
                        continue
            return None
    return None


def _shard_rows(array: zarr.Array) -> int:
    """Rows along N of one stored file of `array`: a shard (a chunk for an unsharded array)."""
    return (array.shards or array.chunks)[0]


def _file_rows(array: zarr.Array, shard: int) -> str:
    """'row 7' or 'rows 8..15': the rows along N that shard `shard` holds."""
    size = _shard_rows(array)
    start, stop = shard * size, min((shard + 1) * size, array.shape[0])
    return f"row {start}" if stop - start == 1 else f"rows {start}..{stop - 1}"


def _file_key(array: zarr.Array, shard: int) -> str:
    """The file name of shard `shard` along N, e.g. 'c.3.0.0.0'."""
    return array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))


def _file_names(array: zarr.Array, shards: Sequence[int], total: int, shown: int = 3) -> str:
    """'c.3.0 (rows 6..7), c.5.0 (rows 10..11), ... (5 in all)' for shard indices along N."""
    names = [f"{_file_key(array, s)} ({_file_rows(array, s)})" for s in shards[:shown]]
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
    """Refuse a feature store with an array or shard file missing (zarr would read fill values).

    The store records the shards each array must have (attrs["shards"], create_feature_store):
    those holding at least one image of the array's image set. A missing one is damage: a
    deleted file, an incomplete checkout or copy. They are compared with one listing of the
    folder, so it stays cheap for any number of images.

    Args:
        path: the store folder.
        root: the store opened at `path`, if it already is.
    Raises:
        InputError: naming each damaged array, a few of its missing shards and how many, and
            the fix.
    """
    path = Path(path)
    root = zarr.open_group(str(path), mode="r") if root is None else root
    expected = root.attrs.get("shards")
    if not isinstance(expected, dict):
        raise InputError(path, "feature store of an older layout (no shard record); rebuild it: "
                               "dvc repro -f -s features")
    present = _stored_files(path)
    problems = []
    for name in FEATURE_ARRAYS:
        try:
            array = root[name]
        except KeyError:
            problems.append(f"array '{name}' is missing")
            continue
        shards = expected.get(name, [])
        missing = [s for s in shards if f"{name}/{_file_key(array, s)}" not in present]
        if missing:
            problems.append(f"array '{name}' lacks {len(missing)} of its {len(shards)} shard files: "
                            f"{_file_names(array, missing, len(missing))}")
    if problems:
        raise InputError(path, "damaged feature store (a missing shard would be read as empty): "
                         + "; ".join(problems) + f"; {_repair(path, 'features')}")


def _store_folder(store: zarr.Group) -> Path:
    """The folder of an opened group, for messages."""
    root = getattr(store.store, "root", None)
    return Path(root) / store.path if root is not None else Path(str(store.store))


def read_rows(store: zarr.Group, name: str, rows: int | slice | np.ndarray = slice(None), *,
              absent_ok: bool = False) -> np.ndarray:
    """Rows of a feature array, with a damaged chunk reported as an InputError, not a zarr traceback.

    Args:
        store: an open feature store (open_features / open_features_of).
        name: an array of FEATURE_ARRAYS, e.g. 'patch' or 'crops/embedding'.
        rows: along N: an index, a slice, or an integer array (any order; orthogonal selection).
        absent_ok: return rows the store does not hold as their fill value (NaN; 255 for
            crops/kind) rather than refusing them.
    Returns:
        The selected rows with every other axis whole: read_rows(store, 'patch', i) is (h, w, D)
        float16, read_rows(store, 'crops/embedding', idx) is (len(idx), D) float16.
    Raises:
        InputError: the store folder, the array, the damaged shard(s) with their rows, and the fix;
            or a row the store does not hold (the patch features of a training image).
    """
    array = store[name]
    if not isinstance(rows, (int, np.integer, slice)):
        rows = np.asarray(rows)
    try:
        if isinstance(rows, np.ndarray):
            values = array.get_orthogonal_selection((rows,) + (slice(None),) * (array.ndim - 1))
        else:
            values = array[rows]
    except (IndexError, TypeError):
        raise                                   # a bad selection: the caller's bug, not damage
    except Exception as exc:  # noqa: BLE001 - codecs raise RuntimeError, ValueError, ...: told apart below
        damaged = _damaged_chunks(array, rows)
        if not damaged:
            raise                               # every chunk reads alone: not damage (memory, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        path = _store_folder(store)
        raise InputError(path, f"array '{name}': shard{'s' if len(damaged) > 1 else ''} "
                         f"{_file_names(array, damaged, len(damaged))} "
                         f"cannot be decoded ({type(exc).__name__}: {first}); the store is damaged; "
                         f"{_repair(path, 'features', [path / name / _file_key(array, s) for s in damaged])}") from None
    if not absent_ok:
        _check_stored(store, name, rows, values)
    return values


def _check_stored(store: zarr.Group, name: str, rows: int | slice | np.ndarray, values: np.ndarray) -> None:
    """Refuse rows the store does not hold (read back as the fill value: NaN, or 255 for kinds),
    e.g. the patch features of a training image: only the evaluation split's are stored."""
    flat = values[None] if isinstance(rows, (int, np.integer)) else values
    if not flat.size:
        return
    first = flat.reshape(len(flat), -1)[:, 0]          # a written row is never fill in any value
    absent = np.flatnonzero(np.isnan(first) if first.dtype.kind == "f" else first == NOT_STORED_KIND)
    if len(absent):
        at = int(absent[0])
        row = int(rows) if isinstance(rows, (int, np.integer)) else \
            range(store[name].shape[0])[rows][at] if isinstance(rows, slice) else int(rows[at])
        raise InputError(_store_folder(store), f"array '{name}' does not hold row {row} (image "
                         f"{row // _rows_per_image(store, name)}): {_HOLDS.get(name, 'it holds some images only')}")


_HOLDS = {"patch": "patch features are stored for the evaluation split only (features.bottom_up_samples "
                   "keeps a sample of the others'); `transfgu inspect features` computes them for any image",
          "patch_sample": "bottom-up samples are stored for the crop split (data.train_split) only",
          "crops/embedding": "crops are stored for the crop split (data.train_split) only",
          "crops/kind": "crops are stored for the crop split (data.train_split) only"}


def _rows_per_image(store: zarr.Group, name: str) -> int:
    key = {"patch_sample": "samples_per_image", "crops/embedding": "windows_per_image",
           "crops/kind": "windows_per_image"}.get(name)
    return max(int(store.attrs.get(key, 1)), 1) if key else 1


def _damaged_chunks(array: zarr.Array, rows: int | slice | np.ndarray, limit: int = 3) -> list[int]:
    """The first `limit` shards along N of the selection `rows` that fail to read on their own."""
    size, n = _shard_rows(array), array.shape[0]
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
    """The feature arrays as lazy dask arrays, keyed like the store ('crops/kind', ...), one dask
    chunk per shard (an inner chunk, one image, would make graphs of millions of tasks)."""
    import dask.array as da

    root = zarr.open_group(str(path), mode="r")
    return {name: da.from_zarr(root[name], chunks=root[name].shards or root[name].chunks)
            for name in FEATURE_ARRAYS}


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
    """HDF5 file with `cam` (N, K, h, w) of `cam_dtype` (recorded in the attribute `cam_dtype`)
    chunked per image, `cam_scale` (N,) float32, `label` (N, h, w) uint8, `image_id` (N,), and
    `done` (N,) bool, which lets an interrupted run resume.

    cam_dtype (pseudolabels.cam_dtype): float32 | float16 | uint16, the last being each image's
    CAMs divided by their maximum in steps of 1/65535 (the step is `cam_scale`; read_cams undoes
    it): as small as float16, with 32 times finer steps near the maximum, where the argmax is
    decided. Uncompressed: the size is known in advance (pipeline.plan), a read costs no decoding;
    each chunk has a checksum, which read_cams and open_pseudolabels turn into an InputError.
    """
    if cam_dtype not in CAM_DTYPES:
        raise ValueError(f"cam_dtype must be one of {', '.join(CAM_DTYPES)}, got {cam_dtype!r}")
    h, w = grid
    n = len(image_ids)
    label_dtype = "uint8" if num_concepts < 255 else "uint16"
    # fletcher32: a checksum per chunk (4 bytes), so that damaged bytes are an error when read,
    # not CAMs that silently train on garbage (its blind spot, 16-bit words turned from 0x0000 to
    # 0xffff or back, reads as NaN in float CAMs: read_cams refuses those too)
    checked = {"fletcher32": True}
    per_chunk = flag_chunk_images(n)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("cam", shape=(n, num_concepts, h, w), dtype=cam_dtype, chunks=(1, num_concepts, h, w),
                              **checked)
        handle.create_dataset("cam_scale", shape=(n,), dtype="float32", fillvalue=1.0, chunks=(per_chunk,), **checked)
        handle.create_dataset("label", shape=(n, h, w), dtype=label_dtype, chunks=(1, h, w), **checked)
        handle.create_dataset("image_id", data=np.array(image_ids, dtype=h5py.string_dtype()))
        handle.create_dataset("done", shape=(n,), dtype="bool", fillvalue=False, chunks=(per_chunk,), **checked)
        for key, value in {**attrs, "cam_dtype": cam_dtype}.items():
            handle.attrs[key] = json.dumps(value, default=json_default)


CAM_DTYPES = ("float32", "float16", "uint16")


def flag_chunk_images(n: int) -> int:
    """Images per chunk of pseudolabels.h5's per-image scales and flags (cam_scale, done), for n
    images: 65,536 at most (what create_pseudolabel_file makes and pipeline.plan counts)."""
    return min(n, 65536) or 1


def encode_cams(cams: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """CAMs (B, K, h, w) float32 as stored in `dtype` (CAM_DTYPES): (stored (B, K, h, w), scale (B,)
    float32), read back as stored * scale (read_cams)."""
    if dtype != "uint16":
        return cams.astype(dtype), np.ones(len(cams), dtype=np.float32)
    top = cams.reshape(len(cams), -1).max(axis=1, initial=0.0)
    step = np.where(top > 0, top / 65535.0, 1.0).astype(np.float32)
    stored = np.rint(np.clip(cams / step[:, None, None, None], 0, 65535)).astype(np.uint16)
    return stored, step


def read_cams(handle: h5py.File, index: int) -> np.ndarray:
    """The CAMs (K, h, w) float32 of image `index` of a pseudo-label file, whatever their stored dtype.

    Raises:
        InputError: naming the file and how to repair it, when the image's chunk fails its
            checksum or holds values no CAM has (NaN, infinite: a file written before checksums).
    """
    cam = _read_row(handle, "cam", index, "CAMs").astype(np.float32)
    if "cam_scale" in handle:
        cam *= _read_row(handle, "cam_scale", index, "CAMs")
    if not np.isfinite(cam).all():
        raise damaged_pseudolabels(handle.filename, f"image {index}'s CAMs hold NaN or infinite values")
    return cam


def read_label(handle: h5py.File, index: int) -> np.ndarray:
    """The hard pseudo label (h, w) of image `index`; a chunk failing its checksum is an
    InputError naming the file, as in read_cams."""
    return _read_row(handle, "label", index, "label")


def _read_row(handle: h5py.File, name: str, index: int, what: str) -> np.ndarray:
    """Row `index` of dataset `name` of a pseudo-label file; HDF5's OSError as _h5_error's
    InputError ("image 3's <what> cannot be read ...")."""
    try:
        return handle[name][index]
    except OSError as exc:
        raise _h5_error(handle.filename, f"image {index}'s {what} cannot be read", exc) from None


def damaged_pseudolabels(path: str | Path, what: str, exc: BaseException | None = None) -> InputError:
    """The error for a damaged pseudo-label file: what failed, and how to repair it."""
    path = Path(path)
    first = f" ({type(exc).__name__}: {str(exc).splitlines()[0]})" if exc is not None and str(exc) else ""
    return InputError(path, f"{what}{first}; the file is damaged; {_repair(path, 'pseudolabels', [path])}")


def _h5_error(path: str | Path, what: str, exc: OSError) -> InputError:
    """An OSError from HDF5 as an InputError: damage (a format or checksum error, which carries
    no errno) with its repair; anything the system reports (a lock held by another process, a
    permission, an I/O error: an errno) as it is, with no repair: the file may well be intact."""
    if exc.errno is None:
        return damaged_pseudolabels(path, what, exc)
    return InputError(path, f"{what}: {type(exc).__name__}: {exc}")


def open_h5(path: str | Path) -> h5py.File:
    """A pseudo-label file opened read-only; a file HDF5 cannot open (truncated, overwritten) is an
    InputError naming it and saying how to repair it."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _h5_error(path, "HDF5 cannot open it", exc) from None


def read_h5_attrs(handle: h5py.File) -> dict:
    return {key: json.loads(value) for key, value in handle.attrs.items()}


def open_pseudolabels(path: str | Path, expected: dict | None = None) -> h5py.File:
    """Open complete pseudo labels read-only, checking provenance if asked."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "pseudo labels not found; run the pseudolabels stage first")
    handle = open_h5(path)
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
            self._handle = open_h5(self.path)
        return read_cams(self._handle, int(self.indices[position]))
