"""Where every artifact lives under the cache folder: the one table of paths.

The stage table (pipeline.stages) names these artifacts as its inputs and outputs and
generates dvc.yaml from them; the stages write them through `Config.path(name)`;
`pipeline.artifacts` opens them. No other module spells a cache path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = "cache"     # the cache folder of the committed dvc.yaml (Config.cache defaults to it)


@dataclass(frozen=True)
class Artifact:
    """One artifact.

    Attributes:
        path: relative to the cache folder.
        description: what it holds, in a few words (dvc.yaml comment, docs).
        dvc: options of its entry in dvc.yaml's outs (``cache: false``, ``persist: true``).
        metric: listed under the stage's ``metrics`` rather than ``outs``.
    """

    path: str
    description: str
    dvc: dict = field(default_factory=dict)
    metric: bool = False


ARTIFACTS: dict[str, Artifact] = {
    "manifest": Artifact("manifest.json", "one row per image: id, split, paths, size"),
    "features": Artifact("features.zarr", "patch features, embeddings, saliency, crop embeddings"),
    "concepts": Artifact("concepts", "k-means centroids, assignments, sizes per crop pool"),
    "pseudolabels": Artifact("pseudolabels.h5", "CAM per image per concept, hard labels"),
    "model": Artifact("model/model.pt", "the trained decoder"),
    "train_log": Artifact("model/train_log.csv", "loss terms per epoch"),
    "train_curves": Artifact("model/train_curves.png", "loss terms per epoch, drawn"),
    # Persisted between runs (DVC would delete it before `train` runs) so that an
    # interrupted training resumes; not cached: it is a means, not a result.
    "checkpoint": Artifact("model/last.pt", "resumable training state", {"cache": False, "persist": True}),
    # No DVC output (neither copied into DVC's cache nor deleted before a run): every experiment
    # on the same images and size reuses it (pipeline.train.stage.training_images).
    "train_images": Artifact("model/train_images.npy", "training images decoded at the training size (uint8)"),
    "metrics": Artifact("metrics.json", "evaluation rows", {"cache": False}, metric=True),
    "plots": Artifact("plots", "confusion matrices, Hungarian matching"),
    "matching": Artifact("plots/matching.json", "cluster -> class per evaluation row"),
    "report": Artifact("report", "static HTML report"),
}


def artifact_path(cache_dir: str | Path, name: str) -> Path:
    """``cache_dir / ARTIFACTS[name].path``."""
    if name not in ARTIFACTS:
        raise KeyError(f"unknown artifact '{name}'; artifacts: {', '.join(ARTIFACTS)}")
    return Path(cache_dir) / ARTIFACTS[name].path
