"""One job per pipeline stage: read the typed config, call the library, write the stage's outs.

`stages/<name>.py` (what DVC runs) and `transfgu <name>` (the CLI) both call
`run_job(name, config)`, so the two can never drift apart. Output locations are
fixed relative to `config.cache` and listed in `OUTPUTS`, which dvc.yaml mirrors.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import Config
from pipeline.runtime import log, resolve_device

_JOBS: dict[str, Callable[[Config], None]] = {}
JOB_HELP: dict[str, str] = {}

# Relative to config.cache; dvc.yaml declares the same paths.
OUTPUTS = {
    "manifest": "manifest.json",
    "features": "features.zarr",
    "concepts": "concepts",
    "pseudolabels": "pseudolabels.h5",
    "model": "model",
    "metrics": "metrics.json",
    "plots": "plots",
    "report": "report",
}


def job(name: str, help: str) -> Callable:
    def register(fn: Callable[[Config], None]) -> Callable[[Config], None]:
        _JOBS[name] = fn
        JOB_HELP[name] = help
        return fn
    return register


def list_jobs() -> list[str]:
    return list(_JOBS)


def run_job(name: str, config: Config) -> None:
    if name not in _JOBS:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(_JOBS)}")
    _JOBS[name](config)


def output(config: Config, key: str) -> Path:
    return config.cache_dir / OUTPUTS[key]


def _backbone(config: Config):
    from pipeline.backbones import create_backbone

    return create_backbone(config.backbone.name, weights=config.backbone.weights or None)


def _manifest(config: Config):
    from pipeline.data import Manifest

    path = output(config, "manifest")
    if not path.exists():
        from pipeline.errors import InputError

        raise InputError(path, "manifest not found; run the prepare stage first")
    return Manifest.load(path)


def _split_indices(manifest, split: str) -> list[int]:
    indices = [i for i, r in enumerate(manifest.records) if r.split == split]
    if not indices:
        splits = sorted({r.split for r in manifest.records})
        raise ValueError(f"split '{split}' has no images in the manifest (it has: {', '.join(splits)})")
    return indices


def _image_size(config: Config) -> tuple[int, int]:
    h, w = config.features.image_size
    return int(h), int(w)


# ----------------------------------------------------------------------------- stages
@job("synthesize", "Generate the deterministic synthetic demo dataset (images, labels, splits).")
def synthesize(config: Config) -> None:
    from pipeline.data import generate_synthetic

    cfg = config.synthetic
    generate_synthetic(cfg.out, n_train=cfg.n_train, n_val=cfg.n_val, size=tuple(cfg.size), seed=cfg.seed)
    log(f"synthesize: {cfg.n_train} train + {cfg.n_val} val images of {cfg.size[0]}x{cfg.size[1]} in {cfg.out}")


@job("prepare", "Check the dataset's layout and write the manifest (one row per image).")
def prepare(config: Config) -> None:
    from pipeline.data import build_manifest

    manifest = build_manifest(config.data.dataset, config.data.root, **(config.data.options or {}))
    for split in (config.data.train_split, config.data.eval_split):
        _split_indices(manifest, split)
    manifest.save(output(config, "manifest"))
    counts = {s: sum(r.split == s for r in manifest.records) for s in sorted({r.split for r in manifest.records})}
    log(f"prepare: {config.data.dataset} at {config.data.root}: {counts}, "
        f"{len(manifest.class_names)} classes")


@job("features", "Embed every image (patch features, embedding, saliency) and the concept crops into Zarr.")
def features(config: Config) -> None:
    from pipeline.features import extract_features

    manifest = _manifest(config)
    backbone = _backbone(config)
    extract_features(manifest, backbone, config.features, output(config, "features"),
                     crop_split=config.data.train_split, batch_size=config.backbone.batch_size,
                     device=resolve_device(config.backbone.device),
                     weights_source=config.backbone.weights)


def _feature_expectation(config: Config) -> dict:
    return {"backbone": config.backbone.name, "params": asdict(config.features),
            "crop_split": config.data.train_split}


@job("concepts", "Cluster the crop embeddings into concepts with FAISS k-means.")
def concepts(config: Config) -> None:
    from pipeline.concepts import concepts_meta, discover_concepts
    from pipeline.store import open_features

    store = open_features(output(config, "features"), expected=_feature_expectation(config))
    found = discover_concepts(store, config.concepts)
    found.save(output(config, "concepts"), concepts_meta(config.concepts, dict(store.attrs)))
    log(f"concepts: {found.k} concepts, sizes {found.sizes.tolist()}")


@job("pseudolabels", "Compute one CAM per image per concept and write them to HDF5.")
def pseudolabels(config: Config) -> None:
    from pipeline.concepts import Concepts
    from pipeline.pseudolabels import write_pseudolabels

    manifest = _manifest(config)
    backbone = _backbone(config)
    found = Concepts.load(output(config, "concepts"))
    provenance = {"backbone": backbone.name, "weights_id": backbone.weights_id,
                  "dataset": manifest.dataset}
    write_pseudolabels(manifest, backbone, found, config.pseudolabels, output(config, "pseudolabels"),
                       image_size=_image_size(config), device=resolve_device(config.backbone.device),
                       provenance=provenance)


def _read_image_fn(manifest, indices: list[int], size: tuple[int, int]) -> Callable[[int], np.ndarray]:
    from pipeline.data import load_image, resize_image

    def read(position: int) -> np.ndarray:
        record = manifest.records[indices[position]]
        return resize_image(load_image(manifest.resolve(record.image)), size)
    return read


def _forget_stale_checkpoint(model_dir: Path, inputs: dict) -> None:
    """`last.pt` persists between DVC runs so an interrupted training resumes; but when the
    pseudo labels or images changed, resuming would continue a model fitted to old labels.
    The inputs' fingerprint is kept beside it, and a checkpoint of other inputs is dropped."""
    from pipeline.store import fingerprint, write_json

    stamp, last = model_dir / "last.inputs.json", model_dir / "last.pt"
    digest = fingerprint(inputs)
    previous = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
    if last.exists() and previous != digest:
        log(f"train: {last} was trained on other pseudo labels or images; starting over")
        last.unlink()
    write_json(stamp, {"fingerprint": digest})


@job("train", "Train the mask-transformer decoder on the frozen backbone from the pseudo labels.")
def train(config: Config) -> None:
    from pipeline.store import CamReader, open_pseudolabels, read_h5_attrs
    from pipeline.train import RESUMABLE_CHANGES, PseudoLabelDataset, TrainConfig, train_segmenter

    manifest = _manifest(config)
    backbone = _backbone(config)
    path = output(config, "pseudolabels")
    indices = _split_indices(manifest, config.data.train_split)
    with open_pseudolabels(path, expected={"backbone": backbone.name, "weights_id": backbone.weights_id}) as h:
        labels_attrs = read_h5_attrs(h)
    num_concepts = int(labels_attrs["num_concepts"])
    train_config = TrainConfig.from_dict(config.train or {})
    if train_config.device == "auto":
        train_config.device = config.backbone.device
    _forget_stale_checkpoint(output(config, "model"), {
        "pseudolabels": {k: labels_attrs.get(k) for k in ("concepts_hash", "params", "grid", "weights_id")},
        "images": [manifest.records[i].id for i in indices],
        "image_size": list(_image_size(config)),
        "train": {k: v for k, v in train_config.to_dict().items() if k not in RESUMABLE_CHANGES},
    })
    dataset = PseudoLabelDataset(_read_image_fn(manifest, indices, _image_size(config)),
                                 CamReader(path, indices), len(indices))
    train_segmenter(backbone, dataset, num_concepts, train_config, output(config, "model"))


@job("evaluate", "Score the model, the pseudo labels and the bottom-up baseline on the evaluation split.")
def evaluate(config: Config) -> None:
    from pipeline.evaluate import BottomUp, ModelScores, cam_scores, evaluate_rows, plot_confusion
    from pipeline.pseudolabels import image_batch
    from pipeline.store import open_features, open_pseudolabels, read_h5_attrs, write_json
    from pipeline.train import load_segmenter

    manifest = _manifest(config)
    backbone = _backbone(config)
    device = resolve_device(config.backbone.device)
    size = _image_size(config)
    eval_indices = _split_indices(manifest, config.data.eval_split)
    train_indices = np.asarray(_split_indices(manifest, config.data.train_split))

    model = load_segmenter(backbone, output(config, "model") / "model.pt")
    model_scores = ModelScores(model, lambda b: image_batch(manifest, b, size), eval_indices,
                               config.evaluate.batch_size, device)
    store = open_features(output(config, "features"), expected=_feature_expectation(config))
    with open_pseudolabels(output(config, "pseudolabels")) as handle:
        k = int(read_h5_attrs(handle)["num_concepts"])
        bottom_up = BottomUp(store, train_indices, k, seed=config.evaluate.bottom_up_seed)
        sources = {
            "model": model_scores,
            "pseudo_labels": lambda i: cam_scores(handle, i),
            "bottom_up": lambda i: bottom_up.scores(store["patch"][i]),
        }
        clusters = {"model": model_scores.num_clusters, "pseudo_labels": k, "bottom_up": k}
        rows = evaluate_rows(manifest, eval_indices, sources, clusters, train_size=size,
                             protocol=config.evaluate.protocol,
                             crf=frozenset({"model"} if config.evaluate.crf else ()))
    metrics = {name: {key: row[key] for key in ("miou", "pixel_accuracy", "per_class_iou", "num_clusters",
                                                   "protocol")} for name, row in rows.items()}
    metrics["evaluation"] = {"protocol": config.evaluate.protocol, "crf": config.evaluate.crf, "split": config.data.eval_split,
                             "images": len(eval_indices), "dataset": manifest.dataset,
                             "model_selection": "last checkpoint (no labels used)"}
    plots = output(config, "plots")
    for name, row in rows.items():
        plot_confusion(row, manifest.class_names, plots / f"confusion_{name}.png", name)
    write_json(plots / "matching.json", {name: row["matching"] for name, row in rows.items()})
    write_json(output(config, "metrics"), metrics)
    log(f"evaluate: wrote {output(config, 'metrics')} and {plots}/ ({json.dumps({n: round(r['miou'], 2) for n, r in rows.items()})})")


@job("report", "Write the static HTML report cache/report/index.html (metrics, IoU bars, confusion, "
               "training curves, concept galleries, sample overlays).")
def report(config: Config) -> None:
    from pipeline.report import ReportOptions, build_report

    build_report(config.cache_dir, output(config, "report"), ReportOptions(eval_split=config.data.eval_split),
                 weights=config.backbone.weights or None)
