"""The manifest: one row per image, written once by the prepare stage and read by all others."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(r.split for r in self.records))

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> list[ImageRecord]:
        """The records of split ``name``, in manifest order."""
        rows = [r for r in self.records if r.split == name]
        if not rows:
            raise ValueError(f"split '{name}' has no images in this {self.dataset} manifest "
                             f"(splits: {', '.join(self.splits) or 'none'})")
        return rows

    def resolve(self, path: str | Path) -> Path:
        """An absolute path stays as is; a relative one is taken relative to ``root``."""
        p = Path(path)
        return p if p.is_absolute() or not self.root else Path(self.root) / p

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "manifest file does not exist")
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
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise InputError(path, f"malformed manifest record: {err}") from None
