"""The `train` pipeline stage: the manifest's training split with its pseudo labels, into the loop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.backbones import backbone_from_config
from pipeline.concepts import Concepts
from pipeline.config import Config, TrainConfig
from pipeline.data import Manifest
from pipeline.errors import InputError
from pipeline.files import fingerprint, write_json
from pipeline.runtime import log
from pipeline.store import CamReader, open_pseudolabels_of, read_h5_attrs
from pipeline.train.curves import plot_training_curves, read_train_log
from pipeline.train.data import ImageCache, PseudoLabelDataset, build_image_cache
from pipeline.train.distributed import Ranks, barrier, ranks_from_env, setup, teardown
from pipeline.train.loop import train_segmenter

# `TRANSFGU_TRAIN_PROCS=N transfgu train` (and so `dvc repro` / `dvc exp run` with it set) runs
# the stage under torchrun with N processes on this node; unset or 1, in this process.
PROCS_ENV = "TRANSFGU_TRAIN_PROCS"


def train_stage(config: Config) -> None:
    """Stage `train`: the decoder on the frozen backbone, from the cached pseudo labels.

    Under torchrun every process runs this; rank 0 alone writes (checkpoint stamp, image
    cache, model files, curves) while the others wait for it where they must read what it wrote.
    """
    if relaunch_under_torchrun(config.train.batch_size):
        return
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
    ranks, _ = setup(train_config.device)
    try:
        model_dir = config.path("model").parent
        if ranks.main:
            forget_stale_checkpoint(model_dir, {
                "pseudolabels": {k: labels_attrs.get(k) for k in ("concepts_hash", "params", "grid", "weights_id")},
                "images": [manifest.records[i].id for i in indices],
                "image_size": list(size),
            })   # a changed train parameter is the loop's to judge: it names the key (checkpoint_mismatch)
        barrier(ranks)   # no rank looks for last.pt before rank 0 has dropped a stale one
        read_image = training_images(manifest, indices, size, config.path("train_images"), train_config, ranks)
        dataset = PseudoLabelDataset(read_image, CamReader(labels_path, indices), len(indices))
        train_segmenter(backbone, dataset, int(labels_attrs["num_concepts"]), train_config, model_dir,
                        background_threshold=config.pseudolabels.background_threshold
                        if config.pseudolabels.background else None)
        if ranks.main:
            plot_training_curves(read_train_log(config.path("train_log")), config.path("train_curves"))
    finally:
        teardown(ranks)


def training_images(manifest: Manifest, indices: list[int], size: tuple[int, int], cache_path: Path,
                    train_config: TrainConfig, ranks: Ranks) -> Callable[[int], np.ndarray]:
    """position -> (H, W, 3) uint8 training image ``indices[position]`` at ``size``.

    With ``train.image_cache`` (default) the images are decoded once into ``cache_path``
    (cache/model/train_images.npy; rank 0 builds it, the others wait) and read from there;
    else decoded from the dataset's files for every sample. The cache lies beside the model
    files but is no DVC output: DVC neither copies it into its cache nor deletes it before a
    run, so it is reused by every experiment on the same images and size.
    """
    def decode(position: int):
        return manifest.image(indices[position], size)

    if not train_config.image_cache:
        return decode
    path = cache_path
    if ranks.main:
        files = [manifest.resolve(manifest.records[i].image) for i in indices]
        stamp = {"images": [_file_stamp(f) for f in files], "size": list(size)}
        build_image_cache(path, decode, len(indices), size, stamp, workers=max(1, train_config.num_workers),
                          log=log)
    barrier(ranks)
    return ImageCache(path)


def _file_stamp(path: Path) -> list:
    """What says an image file changed: its path, size and modification time."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(path, "file does not exist") from None
    return [str(path), st.st_size, st.st_mtime_ns]


def relaunch_under_torchrun(batch_size: int) -> bool:
    """With ``TRANSFGU_TRAIN_PROCS=N`` (N > 1) set and not already under torchrun: run this same
    command as N processes through ``torch.distributed.run --standalone`` and wait for them.

    Returns whether it did (the caller then has nothing left to do). A batch size that N does
    not divide is refused before any process starts; a failed run exits with torchrun's status
    (its processes printed their error).
    """
    procs = os.environ.get(PROCS_ENV, "").strip()
    if not procs or ranks_from_env().enabled or "WORLD_SIZE" in os.environ:
        return False
    if not procs.isdigit() or int(procs) < 1:
        raise InputError(None, f"{PROCS_ENV}={procs!r}: expected a number of processes (1, 2, ...)")
    if int(procs) == 1:
        return False
    if batch_size % int(procs):
        raise InputError(None, f"train.batch_size {batch_size} cannot be split evenly over {PROCS_ENV}={procs} "
                               f"processes: use a multiple of {procs}")
    if sys.argv[1:2] != ["train"]:
        raise InputError(None, f"{PROCS_ENV}={procs} relaunches the command line `transfgu train ...`, but this "
                               f"process is {sys.argv!r}; start it with torchrun instead (README, Running at scale)")
    # the same CLI call in every process (the same params file and --set overrides)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "pipeline.cli", *sys.argv[1:]]
    log(f"train: {PROCS_ENV}={procs}: running under torchrun: {' '.join(command)}")
    status = subprocess.run(command, env={**os.environ, PROCS_ENV: ""}).returncode
    if status:
        raise SystemExit(status)          # the processes said why; no second traceback here
    return True


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
