"""Typed view of `params.yaml`.

Each stage reads one section. Unknown keys are errors (a typo in params.yaml must not
silently fall back to a default), and every dotted key can be overridden from the
command line with `--set section.key=value` (YAML syntax for the value), the same
way `dvc exp run --set-param` does.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError


@dataclass
class DataConfig:
    dataset: str = "synthetic"          # reader name (`transfgu datasets` lists them)
    root: str = "data/synthetic"        # dataset folder
    options: dict = field(default_factory=dict)   # reader-specific options
    train_split: str = "train"          # concepts, pseudo labels and training
    eval_split: str = "val"             # evaluation


@dataclass
class SyntheticConfig:
    out: str = "data/synthetic"
    n_train: int = 160
    n_val: int = 40
    size: list[int] = field(default_factory=lambda: [224, 224])
    seed: int = 0


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str = ""                   # local checkpoint; empty = the registry's default source
    batch_size: int = 16
    device: str = "auto"                # auto | cpu | cuda


@dataclass
class FeaturesConfig:
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # training size (H, W)
    concept_scale: float = 2.0          # crops are cut from the image resized to this x training size
    crop_fractions: list[float] = field(default_factory=lambda: [0.5, 0.4, 0.3, 0.2])
    crop_stride: float = 0.5            # stride as a fraction of the window side
    crop_size: int = 320                # every crop is resized to crop_size x crop_size
    pools: list[str] = field(default_factory=lambda: ["thing", "stuff"])  # thing, stuff, all
    thing_fraction: float = 0.5         # thing crop: more than this share is foreground
    stuff_fraction: float = 0.8         # stuff crop: more than this share is background
    chunk_images: int = 64              # images per progress/resume shard


@dataclass
class ConceptsConfig:
    k: dict = field(default_factory=lambda: {"thing": 12, "stuff": 15})  # clusters per pool
    iterations: int = 100
    restarts: int = 1                   # k-means runs from different seeds; the best objective is kept
    seed: int = 0
    max_points_per_centroid: int = 256  # faiss' subsampling for training; all crops are assigned
    normalize: bool = False             # L2-normalise crop embeddings before k-means


@dataclass
class PseudoLabelsConfig:
    mass: float = 0.8                   # gradient mass kept by the binarisation
    background: bool = False            # object-centric sets add relu(threshold - max CAM)
    background_threshold: float = 0.1
    batch_size: int = 8


@dataclass
class EvaluateConfig:
    protocol: str = "reference"         # reference | native | stego (`transfgu protocols`)
    crf: bool = False                   # dense-CRF refinement of the model row (needs the [crf] extra)
    batch_size: int = 16
    bottom_up_seed: int = 0


@dataclass
class Config:
    setting: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    pseudolabels: PseudoLabelsConfig = field(default_factory=PseudoLabelsConfig)
    train: dict = field(default_factory=dict)   # fields of pipeline.train.TrainConfig
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cache: str = "cache"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache)

    def section(self, name: str) -> dict:
        """The plain dict of one section, as recorded in artifacts' provenance."""
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return raw
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise InputError(source, f"'{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(source, f"unknown key(s) in '{where}': {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _build(hints[name], value, f"{where}.{name}" if where else name, source)
    return cls(**kwargs)


def parse_overrides(overrides: typing.Iterable[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings -> ([a, b], parsed YAML value)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise InputError(None, f"override '{item}' is not of the form section.key=value")
        key, value = item.split("=", 1)
        parsed.append((key.strip().split("."), yaml.safe_load(value)))
    return parsed


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    raw = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides):
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise InputError(None, f"cannot set {'.'.join(keys)}: '{key}' is not a section")
        node[keys[-1]] = value
    return raw


def load_config(path: str | Path = "params.yaml", overrides: typing.Iterable[str] = ()) -> Config:
    """Read params.yaml (missing sections take their defaults) and apply `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from exc
    raw = apply_overrides(raw, overrides)
    return _build(Config, raw, "", str(path))
