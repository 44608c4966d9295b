"""Named settings: one per paper row, plus `camvid` and `demo`, each a complete params.yaml.

A setting is the paper's defaults (`PAPER`, COCO-Stuff-27 as in method.md) with its
own overrides. `transfgu settings use NAME` writes it to params.yaml; the committed
params.yaml is the `demo` setting (a test keeps the two equal), so there is one
source for every number.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pipeline.config import ComputeConfig, TrainConfig
from pipeline.files import atomic_write
from pipeline.registry import Registry

# The paper's hyperparameters (method.md); every setting starts from these. Every key of
# every section is present (DVC's --set-param only overrides keys that exist).
PAPER: dict = {
    "setting": "cocostuff27",
    "synthetic": {"out": "data/synthetic", "n_train": 160, "n_val": 40, "size": [224, 224], "seed": 0},
    "data": {"dataset": "cocostuff27", "root": "data/cocostuff", "options": {},
             "train_split": "train", "eval_split": "val"},
    "backbone": {"name": "vit_small_patch8_224.dino", "weights": "", "batch_size": 32, "device": "auto"},
    "features": {"image_size": [320, 320], "concept_scale": 2.0, "crop_fractions": [0.5, 0.4, 0.3, 0.2],
                 "crop_stride": 0.5, "crop_size": 320, "pools": ["thing", "stuff"],
                 "thing_fraction": 0.5, "stuff_fraction": 0.8, "foreground": "concept_scale", "windows": "reference",
                 "chunk_images": 256, "bottom_up_samples": 200_000},
    # k-means on every crop (utils/kmeans.py sets faiss' max_points_per_centroid to 10,000,000:
    # subsampling off), then each centroid = the mean of its members, as train_kmeans_faiss
    "concepts": {"k": {"thing": 12, "stuff": 15}, "iterations": 100, "restarts": 1, "seed": 0,
                 "max_points_per_centroid": None, "normalize": False, "algorithm": "faiss",
                 "recompute_centroids": True},
    # grad_scale 1/8: the reference generates COCO pseudo labels in batches of 8 and averages the loss
    # cam_dtype uint16: the size of float16 (COCO's 123k images: 10.9 GB, float32 21 GB), where float16
    # flips the argmax of 19% of ViT-S/8 CAM pixels at grad_scale 1/8 and uint16 0.7% (12 CamVid
    # images, random weights: make bench-cam-precision). frozen_bf16 (CUDA only): blocks 1..11 in bf16,
    # about half the CAM pass's time, moves 0.6% of argmaxes on the same ViT (median top-2 gap 3e-4)
    "pseudolabels": {"mass": 0.8, "background": False, "background_threshold": 0.1, "batch_size": 32,
                     "grad_scale": 0.125, "cam_dtype": "uint16", "frozen_bf16": True},
    # Every training constant, so that any of them can be set with `dvc exp run -S train.<key>=...`.
    # the reference decoder's class-token init and discrete crop scales (segmenter_*.py)
    "train": {**TrainConfig().to_dict(), "num_workers": 8, "decoder_token_init": "reference",
              "crop_scale_step": 0.1},
    "evaluate": {"protocol": "reference", "crf": False, "flip": False, "batch_size": 64, "bottom_up_seed": 0},
    # Where the per-image shards run: never a DVC param (pipeline/compute.py); in-process by default
    "compute": asdict(ComputeConfig()),
}


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    overrides: dict = field(default_factory=dict)
    paper: str = ""                    # published mIoU / pixel accuracy (method.md), "" when none

    def params(self, data_root: str | None = None) -> dict:
        params = merge_params(copy.deepcopy(PAPER), self.overrides)
        params["setting"] = self.name
        if data_root:
            params["data"]["root"] = str(data_root)
        return params


def merge_params(base: dict, extra: dict) -> dict:
    """Nested update; a mapping under `concepts.k` or `data.options` replaces rather than merges,
    since its keys are the choice itself (the pools, the reader's options)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in ("k", "options"):
            merge_params(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


SETTINGS: Registry[Setting] = Registry("setting")


def register_setting(setting: Setting) -> Setting:
    return SETTINGS.register(setting.name, setting)


def write_params(name: str, path: str | Path = "params.yaml", data_root: str | None = None) -> Path:
    """params.yaml for a setting, with a header saying where it came from."""
    setting = SETTINGS.get(name)
    path = Path(path)
    header = (f"# Setting '{name}': {setting.description}\n"
              f"# Written by `transfgu settings use {name}` from pipeline/settings.py; edit either,\n"
              f"# or override single keys with `transfgu <stage> --set key=value` / `dvc exp run -S key=value`.\n")
    text = header + yaml.safe_dump(setting.params(data_root), sort_keys=False, default_flow_style=None, width=100)
    return atomic_write(path, text)


# ----------------------------------------------------------------------------- CPU settings
# What the three 2-core settings share: the offline backbone and CPU-sized batches.
_CPU = {
    "backbone": {"name": "efficientnet_lite0", "batch_size": 16},
    "features": {"crop_size": 96, "chunk_images": 32, "foreground": "upsampled", "windows": "even"},
    # Grad-CAM (EfficientNet) maps are scale-free under min-max normalisation: no batch averaging
    "pseudolabels": {"batch_size": 16, "grad_scale": 1.0, "cam_dtype": "float16", "frozen_bf16": False},
    # k-means trained on 256 sampled crops per concept, centroids as k-means leaves them: the
    # README's demo and CamVid figures were measured so
    "concepts": {"max_points_per_centroid": 256, "algorithm": "faiss", "recompute_centroids": False},
    "train": {"lr": 1.0e-4, "batch_size": 16, "num_workers": 2, "decoder_token_init": "orthogonal",
              "crop_scale_step": None},
    "evaluate": {"batch_size": 16},
}


def _cpu(overrides: dict) -> dict:
    return merge_params(copy.deepcopy(_CPU), overrides)


register_setting(Setting(
    "demo", "synthetic scenes, offline EfficientNet-Lite0, sized for 2 CPU cores (~5 min)", _cpu({
        "data": {"dataset": "synthetic", "root": "data/synthetic"},
        "features": {"image_size": [224, 224], "concept_scale": 1.0, "crop_fractions": [0.5, 0.3]},
        "concepts": {"k": {"thing": 3, "stuff": 4}},
        "train": {"epochs": 12, "bootstrap_start": 4, "teacher_interval": 4},
    })))

register_setting(Setting(
    "camvid", "CamVid 11 classes (SegNet layout), offline EfficientNet-Lite0, sized for 2 CPU cores", _cpu({
        "data": {"dataset": "camvid", "root": "../shared/data/camvid"},
        "features": {"image_size": [240, 320], "concept_scale": 2.0, "crop_fractions": [0.5, 0.4, 0.3],
                     "pools": ["all"]},
        "concepts": {"k": {"all": 11}},
        # drop_last off: the README's CamVid figures were measured keeping the last partial batch
        "train": {"epochs": 30, "bootstrap_start": 10, "teacher_interval": 10, "drop_last": False},
    })))

# Your own images: every image of the folder is both the training and the evaluation split
# (no labels needed: evaluation rows that need labels are skipped, the model still predicts).
register_setting(Setting(
    "folder", "a folder of your own images, no labels needed (--data-root DIR), offline EfficientNet-Lite0, "
              "2 CPU cores", _cpu({
        "data": {"dataset": "folder", "root": "data/images", "train_split": "train", "eval_split": "train"},
        "features": {"image_size": [224, 224], "concept_scale": 1.0, "crop_fractions": [0.5, 0.3],
                     "pools": ["all"]},
        "concepts": {"k": {"all": 8}},
        # a folder may hold fewer images than a batch: keep the last partial batch
        "train": {"epochs": 12, "bootstrap_start": 4, "teacher_interval": 4, "drop_last": False},
    })))

# ----------------------------------------------------------------------------- the paper's rows
# The reference's COCO image list: images with an instance annotation (cocostuff_trainval.py
# lists imgToAnns of annotations/instances_<split>2017.json).
_COCO_IMAGES = {"annotated_only": True}
register_setting(Setting("cocostuff27", "COCO-Stuff 27 classes, 12 thing + 15 stuff concepts",
                         {"data": {"options": _COCO_IMAGES}}, "16.19 / 44.52"))
register_setting(Setting(
    "cocostuff171", "COCO-Stuff 171 classes, 80 thing + 91 stuff concepts",
    {"data": {"dataset": "cocostuff171", "options": _COCO_IMAGES}, "concepts": {"k": {"thing": 80, "stuff": 91}},
     "train": {"teacher_interval": [3, 3, 3, 2], "bootstrap_start": 3}}, "11.93 / 34.32"))
register_setting(Setting(
    "cocostuff27_curated", "COCO-Stuff 27 classes on the curated lists (49,629 train, 2,175 val images)",
    # Command.md, "To train the model (on the curated data)": lr 2.2e-4, teacher interval 1, start 1
    {"data": {"options": {**_COCO_IMAGES, "curated": True}}, "train": {"lr": 2.2e-4, "teacher_interval": 1, "bootstrap_start": 1}},
    "16.19 / 44.52"))
register_setting(Setting(
    "coco80", "COCO 80 things + background (thing crops only, background channel)",
    # coco_trainval.py loads configs/cocostuff.yaml (teacher interval 3,3,3,2, start 3); Command.md keeps it
    {"data": {"dataset": "coco80", "options": _COCO_IMAGES}, "features": {"pools": ["thing"]}, "concepts": {"k": {"thing": 80}},
     "pseudolabels": {"background": True},
     "train": {"teacher_interval": [3, 3, 3, 2], "bootstrap_start": 3}}, "12.69 / 64.31"))
register_setting(Setting(
    "cityscapes27", "Cityscapes 27 classes, one pool of all windows (306 per image)",
    {"data": {"dataset": "cityscapes27", "root": "data/cityscapes"},
     "features": {"image_size": [320, 640], "pools": ["all"]},
     # cityscapes_generate_pseudo_label.py clusters with utils/kmeans.train_kmeans: sklearn's
     # MiniBatchKMeans, whose n_init was 3 in the pinned scikit-learn 1.0.1 (requirements.txt)
     "concepts": {"k": {"all": 27}, "algorithm": "minibatch", "restarts": 3},
     # configs/cityscapes.yaml: repeat 20; Command.md: pseudo labels in batches of 2
     "pseudolabels": {"grad_scale": 0.5},
     "train": {"epochs": 50, "lr": 5.0e-5, "teacher_interval": 1, "bootstrap_start": 1, "repeat": 20}},
    "16.83 / 77.92"))
register_setting(Setting(
    "voc21", "Pascal VOC 2012, 20 classes + background (foreground crops only)",
    {"data": {"dataset": "voc21", "root": "data/VOCdevkit/VOC2012"},
     "features": {"crop_fractions": [0.6, 0.5, 0.4, 0.3], "pools": ["thing"]},
     "concepts": {"k": {"thing": 20}}, "pseudolabels": {"background": True},
     # configs/pascalvoc.yaml: repeat 20
     "train": {"epochs": 100, "batch_size": 512, "bootstrap_start": 5, "repeat": 20,
               "teacher_interval": [5, 5, 5, 5, 4, 4, 4, 4, 4, 3]}}, "37.15 / 83.59"))
# LIP (reference lip_*.py): crops cut from 1280x640 images (concept scale 2), CAMs and evaluation
# at 640x320 (lip_generate_pseudo_label.py, lip_trainval.py's val resize 320); LIP-5 and LIP-16
# train at 480x240 (Command.md: dataset.resize=240), LIP-19 at 640x320.
for _k, _train_size, _lr, _batch, _interval, _start, _paper in [
    (5, [480, 240], 1.0e-4, 512, 2, 2, "25.16 / 65.76"),
    (16, [480, 240], 2.0e-5, 512, 2, 2, "15.49 / 60.08"),
    (19, None, 2.0e-5, 256, [3, 3, 3, 2], 3, "12.24 / 42.52"),
]:
    register_setting(Setting(
        f"lip{_k}", f"LIP, {_k} part groups + background (one pool)",
        {"data": {"dataset": f"lip{_k}", "root": "data/LIP"},
         "features": {"image_size": [640, 320], "pools": ["all"]},
         # lip_generate_pseudo_label.py: utils/kmeans.train_kmeans, MiniBatchKMeans (n_init 3 in 1.0.1)
         "concepts": {"k": {"all": _k}, "algorithm": "minibatch", "restarts": 3},
         "pseudolabels": {"background": True, "grad_scale": 0.5},     # Command.md: batches of 2
         "train": {"epochs": 100, "lr": _lr, "batch_size": _batch, "teacher_interval": _interval,
                   "bootstrap_start": _start, "image_size": _train_size}}, _paper))
