"""The `train` pipeline stage: the manifest's training split with its pseudo labels, into the loop."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.backbones import backbone_from_config
from pipeline.concepts import Concepts
from pipeline.config import Config
from pipeline.data import Manifest
from pipeline.errors import InputError
from pipeline.files import fingerprint, write_json
from pipeline.runtime import log
from pipeline.store import CamReader, open_pseudolabels_of, read_h5_attrs
from pipeline.train.curves import plot_training_curves, read_train_log
from pipeline.train.data import PseudoLabelDataset
from pipeline.train.loop import train_segmenter


def train_stage(config: Config) -> None:
    """Stage `train`: the decoder on the frozen backbone, from the cached pseudo labels."""
    manifest = Manifest.load(config.path("manifest"))
    backbone = backbone_from_config(config.backbone)
    labels_path = config.path("pseudolabels")
    indices = manifest.indices(config.data.train_split)
    # Before anything else, and above all before forget_stale_checkpoint: labels of another K,
    # concepts, backbone, size or image list would train a wrong model and drop the good last.pt.
    with open_pseudolabels_of(config, backbone, Concepts.load(config.path("concepts")), manifest) as handle:
        labels_attrs = read_h5_attrs(handle)
    train_config = config.train
    if train_config.device == "auto":
        train_config.device = config.backbone.device
    size = tuple(int(v) for v in (train_config.image_size or config.image_size))
    if len(size) != 2 or size[0] % backbone.patch_size or size[1] % backbone.patch_size:
        raise InputError(None, f"train.image_size {list(size)} must be (H, W), multiples of the patch size "
                               f"{backbone.patch_size}")
    model_dir = config.path("model").parent
    forget_stale_checkpoint(model_dir, {
        "pseudolabels": {k: labels_attrs.get(k) for k in ("concepts_hash", "params", "grid", "weights_id")},
        "images": [manifest.records[i].id for i in indices],
        "image_size": list(size),
    })   # a changed train parameter is the loop's to judge: it names the key (checkpoint_mismatch)
    dataset = PseudoLabelDataset(lambda position: manifest.image(indices[position], size),
                                 CamReader(labels_path, indices), len(indices))
    train_segmenter(backbone, dataset, int(labels_attrs["num_concepts"]), train_config, model_dir,
                    background_threshold=config.pseudolabels.background_threshold
                    if config.pseudolabels.background else None)
    plot_training_curves(read_train_log(config.path("train_log")), config.path("train_curves"))


def forget_stale_checkpoint(model_dir: Path, inputs: dict) -> None:
    """`last.pt` persists between DVC runs so an interrupted training resumes; but when the
    pseudo labels or images changed, resuming would continue a model fitted to old labels.
    The inputs' fingerprint is kept beside it, and a checkpoint of other inputs is dropped."""
    stamp, last = model_dir / "last.inputs.json", model_dir / "last.pt"
    digest = fingerprint(inputs)
    previous = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
    if last.exists() and previous != digest:
        log(f"train: not resuming {last} (it was trained on other pseudo labels or images); starting over")
        last.unlink()
    write_json(stamp, {"fingerprint": digest})
