"""The manifest: one row per image, written once by the prepare stage and read by all others."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.images import images_to_tensor, load_image, resize_image
from pipeline.errors import InputError
from pipeline.files import atomic_write

if TYPE_CHECKING:
    import torch

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset. ``label`` is None for images without ground truth."""

    id: str
    split: str
    image: str
    label: str | None
    height: int
    width: int


@dataclass
class Manifest:
    """A dataset as the pipeline sees it: classes, ignore index and every image with its size.

    ``dataset`` names the reader that built it; it decides how labels are decoded
    (:func:`pipeline.data.load_label`). Record paths may be absolute or relative to ``root``;
    :meth:`resolve` turns either into a usable path.
    """

    dataset: str
    class_names: list[str]
    ignore_index: int = 255
    records: list[ImageRecord] = field(default_factory=list)
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False, repr=False)   # the file it was loaded from
    # Folder a relative ``root`` is relative to: the project the stages ran in (None: the
    # working directory, where DVC runs them). Not stored, so a moved project keeps its manifest.
    project_dir: Path | None = field(default=None, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(r.split for r in self.records))

    def __len__(self) -> int:
        return len(self.records)

    def indices(self, split: str) -> list[int]:
        """Manifest indices of the images of ``split``, in order; an InputError when it has none."""
        rows = [i for i, r in enumerate(self.records) if r.split == split]
        if not rows:
            raise InputError(self.path, f"split '{split}' has no images in this {self.dataset} manifest "
                                        f"(splits: {', '.join(self.splits) or 'none'})")
        return rows

    def split(self, name: str) -> list[ImageRecord]:
        """The records of split ``name``, in manifest order."""
        return [self.records[i] for i in self.indices(name)]

    def image(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Image ``index`` as (H, W, 3) uint8, at its own size or resized (bilinear) to ``size`` (H, W).

        The one way every stage reads a dataset image."""
        img = load_image(self.resolve(self.records[index].image))
        return img if size is None else resize_image(img, size)

    def batch(self, indices: list[int] | range, size: tuple[int, int]) -> "torch.Tensor":
        """Images ``indices`` resized to ``size``, as (B, 3, H, W) float32 in [0, 1]."""
        return images_to_tensor([self.image(i, size) for i in indices])

    def resolve(self, path: str | Path) -> Path:
        """An absolute path stays as is; a relative one is taken relative to ``root`` (itself, when
        relative, relative to ``project_dir``)."""
        p = Path(path)
        if p.is_absolute() or not self.root:
            return p
        root = Path(self.root)
        return (root if root.is_absolute() or self.project_dir is None else self.project_dir / root) / p

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "dataset": self.dataset,
            "class_names": list(self.class_names),
            "ignore_index": int(self.ignore_index),
            "root": self.root,
            "options": self.options,
            "records": [asdict(r) for r in self.records],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        return cls(
            dataset=str(data["dataset"]),
            class_names=[str(c) for c in data["class_names"]],
            ignore_index=int(data.get("ignore_index", 255)),
            records=[ImageRecord(**r) for r in data["records"]],
            root=str(data.get("root", "")),
            options=dict(data.get("options", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write JSON atomically: a reader never sees a half-written manifest."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, project_dir: str | Path | None = None) -> "Manifest":
        """Read a manifest; ``project_dir`` is where its relative data root lives (default: the
        working directory, the project root where the stages run)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "manifest file does not exist; run the prepare stage first")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(path, f"unreadable manifest: {err}") from None
        missing = [k for k in ("dataset", "class_names", "records") if k not in data]
        if missing:
            raise InputError(path, f"not a manifest: missing key(s) {', '.join(missing)}")
        if int(data.get("format", MANIFEST_FORMAT)) > MANIFEST_FORMAT:
            raise InputError(path, f"manifest format {data['format']} is newer than this code "
                                   f"understands ({MANIFEST_FORMAT})")
        try:
            manifest = cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise InputError(path, f"malformed manifest record: {err}") from None
        manifest.path = path
        manifest.project_dir = Path(project_dir) if project_dir is not None else None
        return manifest
