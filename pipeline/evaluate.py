"""Evaluation: three rows scored the same way over the evaluation split.

- `model`: the trained segmenter's predictions;
- `pseudo_labels`: the CAMs alone (argmax of the min-max normalised maps, as stored);
- `bottom_up`: k-means with the same number of clusters directly on the dense patch
  features (L2-normalised), fitted on the concept split: the bottom-up reference.

Every row gives a score map per image at the patch grid of the training-size input
(the model row: of the protocol's model input, where the protocol has one, as `stego`);
a protocol (registry below) decides the geometry in which predictions and labels
are compared. One confusion matrix over the whole split per row, one Hungarian
matching (`pipeline.metrics.SegmentationMetrics`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from pipeline.backbones import backbone_from_config
from pipeline.cam import normalize_cams
from pipeline.concepts import Concepts
from pipeline.config import Config
from pipeline.data import Manifest, images_to_tensor, load_label, resize_image, resize_label
from pipeline.errors import InputError
from pipeline.files import atomic_write, write_json
from pipeline.metrics import SegmentationMetrics
from pipeline.registry import Registry
from pipeline.runtime import autocast, import_faiss, log, progress, resolve_device
from pipeline.store import open_features_of, open_pseudolabels_of, read_cams, read_h5_attrs, read_rows
from pipeline.train.inference import load_segmenter

faiss = import_faiss()


# ----------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class EvalProtocol:
    """How a native-resolution label and score map are brought to the scoring geometry.

    `target_size(native (H, W), train (H, W))` gives the size predictions are upsampled
    to; `crop(size)` the window of that grid that is scored (y0, x0, y1, x1).
    `resize_label(label, size)` brings the label to `target_size` (None: nearest, torch's).
    `model_input(image (H, W, 3) uint8) -> (h, w, 3) uint8`, when set, is what the model row is
    fed: an image already in the scored window's geometry, so that the model's scores are only
    upsampled to the window (None: the model sees the training-size image and its scores are
    brought to the window like every row's). The pseudo_labels and bottom_up rows are stored
    at the training size and always take the second way.
    """

    name: str
    description: str
    target_size: Callable[[tuple[int, int], tuple[int, int]], tuple[int, int]]
    crop: Callable[[tuple[int, int]], tuple[int, int, int, int]]
    resize_label: Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None = None
    model_input: Callable[[np.ndarray], np.ndarray] | None = None


PROTOCOLS: Registry[EvalProtocol] = Registry("evaluation protocol", param="evaluate.protocol")


def _whole(size: tuple[int, int]) -> tuple[int, int, int, int]:
    return 0, 0, size[0], size[1]


# STEGO's evaluation input (github.com/mhamilton723/STEGO, src/eval_segmentation.py builds the
# val set with transform=get_transform(cfg.res, False, "center") and target_transform=
# get_transform(cfg.res, True, "center"), res 320 in src/configs/eval_config.yml; src/utils.py
# get_transform: T.Resize(res, Image.NEAREST) then T.CenterCrop(res), for the image AND the
# label, then ToTensor + ImageNet normalisation for the image). torchvision's Resize(int) matches
# the shorter side and truncates the longer: int(res * long / short); CenterCrop's offsets are
# int(round((H - res) / 2)), Python's round. Both on the PIL image, PIL's NEAREST.
STEGO_RES = 320


def _stego_size(native: tuple[int, int], side: int = STEGO_RES) -> tuple[int, int]:
    h, w = native
    return (int(side * h / w), side) if w <= h else (side, int(side * w / h))


def _stego_crop(size: tuple[int, int], side: int = STEGO_RES) -> tuple[int, int, int, int]:
    h, w = size
    y0, x0 = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    return y0, x0, y0 + side, x0 + side


def stego_image(image: np.ndarray) -> np.ndarray:
    """The image (H, W, 3) uint8 as STEGO's model sees it: (320, 320, 3) uint8, nearest-resized
    to shortest side 320 and centre-cropped (the backbone then scales to [0, 1] and normalises,
    as STEGO's ToTensor + normalize)."""
    h, w = _stego_size(image.shape[:2])
    y0, x0, y1, x1 = _stego_crop((h, w))
    return np.asarray(Image.fromarray(np.asarray(image)).resize((w, h), Image.Resampling.NEAREST))[y0:y1, x0:x1]


PROTOCOLS.register("reference", EvalProtocol(
    "reference", "image and label squashed to the training size (labels nearest), as the TransFGU code",
    lambda native, train: tuple(train), _whole))
PROTOCOLS.register("native", EvalProtocol(
    "native", "predictions upsampled (bilinear scores) to each label's own resolution",
    lambda native, train: tuple(native), _whole))
PROTOCOLS.register("stego", EvalProtocol(
    "stego", "as STEGO's eval: image and label resized (nearest) to shortest side 320 and centre-cropped "
             "320x320; the model is fed that crop (evaluate.flip: STEGO's flip averaging). pseudo_labels and "
             "bottom_up are stored at the training size: their scores are upsampled to that geometry",
    lambda native, train: _stego_size(native), _stego_crop, resize_label, stego_image))


def _resize_label_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if tuple(label.shape) == tuple(size):
        return label
    t = torch.from_numpy(label.astype(np.int64))[None, None].float()
    return F.interpolate(t, size=size, mode="nearest")[0, 0].to(torch.int64).numpy()


def score_to_prediction(scores: torch.Tensor, native: tuple[int, int], train: tuple[int, int],
                        protocol: EvalProtocol, image: np.ndarray | None = None, *,
                        at_input: bool = False) -> np.ndarray:
    """Scores (K, h, w) -> predicted cluster ids in the protocol's geometry.

    `at_input`: the scores are of the protocol's model input (`protocol.model_input`), which
    is the scored window itself: they are only upsampled (bilinear) to it, as STEGO upsamples
    its output to the label's size (src/eval_segmentation.py). Otherwise they are of the
    training-size image: upsampled to `target_size`, then cropped.
    With `image` (the native (H, W, 3) uint8 image), the scores are read as logits and
    refined by a dense CRF on that image in the same geometry before the argmax.
    """
    size = protocol.target_size(native, train)
    y0, x0, y1, x1 = protocol.crop(size)
    if at_input:
        if protocol.model_input is None:
            raise ValueError(f"protocol {protocol.name!r} has no model input of its own")
        up = F.interpolate(scores[None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        if image is not None:
            return dense_crf(protocol.model_input(image), up.softmax(0).numpy()).argmax(0)
        return up.argmax(0).numpy()
    up = F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    up = up[:, y0:y1, x0:x1]
    if image is not None:
        return dense_crf(resize_image(image, size)[y0:y1, x0:x1], up.softmax(0).numpy()).argmax(0)
    return up.argmax(0).numpy()


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl & Koltun) over probs (K, H, W) on image (H, W, 3) uint8.

    STEGO's parameters: Gaussian kernel (sxy 1, weight 3), bilateral kernel (sxy 67,
    srgb 3, weight 4), 10 mean-field iterations. Needs `pip install -e '.[crf]'` (pydensecrf2).
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise RuntimeError("evaluate.crf needs pydensecrf2: pip install -e '.[crf]'") from exc
    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(k, h, w)


def label_in_protocol(label: np.ndarray, train: tuple[int, int], protocol: EvalProtocol) -> np.ndarray:
    size = protocol.target_size(tuple(label.shape), train)
    resized = (protocol.resize_label or _resize_label_nearest)(label, size)
    y0, x0, y1, x1 = protocol.crop(size)
    return resized[y0:y1, x0:x1]


# ----------------------------------------------------------------------------- score sources
def cam_scores(handle: h5py.File, index: int) -> torch.Tensor:
    """The stored CAMs of one image as scores (K, h, w), normalised as the hard pseudo
    labels are (`pipeline.cam.cams_to_labels`), so their argmax is the pseudo label."""
    cam = torch.from_numpy(read_cams(handle, index))
    return normalize_cams(cam[None])[0]


class BottomUp:
    """k-means on L2-normalised dense patch features; scores are negative distances.

    Trained on the training images' patch vectors the feature store samples for it
    (`patch_sample`, features.bottom_up_samples in all), so training never reads whole patch maps.
    """

    def __init__(self, store: zarr.Group, train_indices: np.ndarray, k: int, seed: int,
                 iterations: int = 50) -> None:
        per = int(store.attrs["samples_per_image"])
        rows = (np.asarray(train_indices, dtype=np.int64)[:, None] * per + np.arange(per)).ravel()
        points = self._normalise(np.asarray(read_rows(store, "patch_sample", rows), dtype=np.float32))
        dim = points.shape[1]
        self.kmeans = faiss.Kmeans(dim, k, niter=iterations, seed=seed, verbose=False,
                                   max_points_per_centroid=max(256, len(points) // k + 1))
        self.kmeans.train(points)
        self.centroids = torch.from_numpy(self.kmeans.centroids.copy())

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))

    def scores(self, patch: np.ndarray) -> torch.Tensor:
        """patch (h, w, D) -> (K, h, w) negative squared distances to the centroids."""
        feats = torch.from_numpy(self._normalise(np.asarray(patch, dtype=np.float32)))
        dist = torch.cdist(feats.flatten(0, 1), self.centroids).pow(2)
        return (-dist).T.reshape(-1, *feats.shape[:2])


# ----------------------------------------------------------------------------- scoring
def evaluate_rows(manifest: Manifest, eval_indices: list[int], sources: dict[str, Callable[[int], torch.Tensor]],
                  num_clusters: dict[str, int], *, train_size: tuple[int, int], protocol: str,
                  crf: frozenset[str] = frozenset(), show_progress: bool = True) -> dict:
    """Score every source (name -> index -> scores (K, h, w)) over the images of eval_indices.

    Sources named in `crf` are refined with a dense CRF on the image before the argmax. A
    source with `at_input` true (a ModelScores fed `model_images(manifest, protocol, ...)`)
    gives scores of the protocol's model input rather than of the training-size image.
    """
    proto = PROTOCOLS.get(protocol)
    num_classes = len(manifest.class_names)
    meters = {name: SegmentationMetrics(num_classes, num_clusters[name], ignore_index=manifest.ignore_index)
              for name in sources}
    for i in progress(eval_indices, desc="evaluate", enabled=show_progress):
        record = manifest.records[i]
        if record.label is None:
            raise InputError(record.image, "image of the evaluation split has no label")
        label = load_label(manifest.resolve(record.label), manifest.dataset, num_classes,
                           expect_size=(record.height, record.width))
        target = label_in_protocol(label, train_size, proto)
        image = manifest.image(i) if crf else None
        for name, source in sources.items():
            pred = score_to_prediction(source(i), (record.height, record.width), train_size, proto,
                                       image if name in crf else None, at_input=getattr(source, "at_input", False))
            meters[name].update(pred, target)
    rows = {}
    for name, meter in meters.items():
        result = meter.compute()
        result["per_class_iou"] = dict(zip(manifest.class_names, result["per_class_iou"]))
        rows[name] = {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
                      "per_class_iou": result["per_class_iou"], "num_clusters": num_clusters[name],
                      "protocol": proto.name + ("+flip" if getattr(sources[name], "flip", False) else "")
                      + ("+crf" if name in crf else ""), "matching": result["matching"],
                      "confusion": result["confusion"], "num_pixels": result["num_pixels"]}
        log(f"evaluate: {name:14s} mIoU {result['miou']:6.2f}  pixel accuracy {result['pixel_accuracy']:6.2f}")
    return rows


def model_images(manifest: Manifest, protocol: EvalProtocol, train_size: tuple[int, int]
                 ) -> Callable[[list[int]], torch.Tensor]:
    """What the model row is fed under `protocol`: `images_of(batch) -> (B, 3, H, W)` in [0, 1].
    The protocol's own model input (stego: STEGO's 320x320 centre crop) or, without one, the
    training-size image. Pair it with ModelScores(..., at_input=protocol.model_input is not None)."""
    if protocol.model_input is None:
        return lambda batch: manifest.batch(batch, train_size)
    return lambda batch: images_to_tensor([protocol.model_input(manifest.image(i)) for i in batch])


class ModelScores:
    """`scores(index) -> logits (K, h, w)` of the model, computed a batch at a time.

    Asked in the order of `indices` (as `evaluate_rows` does), each batch runs once and
    only one batch is held, so memory stays flat over any split size (171 classes on
    5,000 COCO images would be 5 GB of logits at once).

    `flip`: STEGO's test-time flip averaging (src/eval_segmentation.py: `(code1 +
    code2.flip(dims=[3])) / 2`, code2 the output for the flipped image), here of the logits.
    `at_input`: the images of `images_of` are the protocol's model input (`model_images`),
    read by `evaluate_rows`.
    """

    def __init__(self, model: torch.nn.Module, images_of: Callable[[list[int]], torch.Tensor],
                 indices: list[int], batch_size: int, device: torch.device, *, flip: bool = False,
                 at_input: bool = False) -> None:
        self.model = model.to(device).eval()
        self.images_of = images_of
        self.indices = list(indices)
        self.position = {index: pos for pos, index in enumerate(self.indices)}
        self.batch_size = batch_size
        self.device = device
        self.flip = flip
        self.at_input = at_input
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            start = self.position[index]
            batch = self.indices[start:start + self.batch_size]
            images = self.images_of(batch).to(self.device)
            with torch.no_grad(), autocast(self.device):
                logits = self.model(images).float()
                if self.flip:
                    logits = (logits + self.model(images.flip(dims=[3])).float().flip(dims=[3])) / 2
            self._cache = dict(zip(batch, logits.cpu()))
        return self._cache[index]

    @property
    def num_clusters(self) -> int:
        return int(self(self.indices[0]).shape[0])


def plot_confusion(row: dict, class_names: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised matched confusion matrix as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(row["confusion"], dtype=np.float64)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted (Hungarian-matched)")
    ax.set_ylabel("ground truth")
    for y in range(n):
        for x in range(n):
            if norm[y, x] >= 0.01:
                ax.text(x, y, f"{100 * norm[y, x]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[y, x] > 0.5 else "black")
    ax.set_title(f"{title}: mIoU {row['miou']:.1f}, pixel acc. {row['pixel_accuracy']:.1f}")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def cluster_shares(scores: Callable[[int], torch.Tensor], indices: list[int], k: int) -> list[float]:
    """Share of the patch-grid pixels of ``indices`` that each of the ``k`` clusters wins (argmax)."""
    counts = np.zeros(k, dtype=np.int64)
    for i in indices:
        counts += np.bincount(scores(i).argmax(0).flatten().numpy(), minlength=k)[:k]
    return [round(float(c), 6) for c in counts / max(int(counts.sum()), 1)]


def evaluate_stage(config: Config) -> None:
    """Stage `evaluate`: the model, pseudo_labels and bottom_up rows over the labelled images of
    the evaluation split. Without labels the rows are skipped with the reason, and what the
    model predicts is summarised (each cluster's share of the pixels)."""
    manifest = Manifest.load(config.path("manifest"))
    device = resolve_device(config.backbone.device)
    size = config.image_size
    split = config.data.eval_split
    eval_indices = manifest.indices(split)
    labelled = [i for i in eval_indices if manifest.records[i].label is not None] if manifest.num_classes else []
    scored = labelled or eval_indices

    backbone = backbone_from_config(config.backbone)
    model = load_segmenter(backbone, config.path("model"))
    protocol = PROTOCOLS.get(config.evaluate.protocol)
    model_scores = ModelScores(model, model_images(manifest, protocol, size), scored,
                               config.evaluate.batch_size, device, flip=config.evaluate.flip,
                               at_input=protocol.model_input is not None)
    info = {"protocol": config.evaluate.protocol, "crf": config.evaluate.crf, "flip": config.evaluate.flip,
            "split": split, "images": len(labelled), "dataset": manifest.dataset,
            "model_selection": "last checkpoint (no labels used)"}
    if not labelled:
        reason = (f"no labels in split '{split}' of the {manifest.dataset} dataset at {manifest.root}: "
                  f"mIoU and pixel accuracy need ground truth")
        metrics = {"model": {"num_clusters": model_scores.num_clusters,
                             "cluster_share": cluster_shares(model_scores, scored, model_scores.num_clusters)},
                   "evaluation": {**info, "skipped": reason}}
        config.path("plots").mkdir(parents=True, exist_ok=True)
        write_json(config.path("matching"), {})
        write_json(config.path("metrics"), metrics)
        log(f"evaluate: rows model, pseudo_labels, bottom_up skipped ({reason}); the model's predictions: "
            f"cache/report/index.html, `transfgu inspect predictions`, `transfgu predict`")
        return
    if len(labelled) < len(eval_indices):
        log(f"evaluate: {len(eval_indices) - len(labelled)} of {len(eval_indices)} images of split '{split}' "
            f"have no label; scoring the {len(labelled)} that have one")
    store = open_features_of(config)
    with open_pseudolabels_of(config, backbone, Concepts.load(config.path("concepts")), manifest) as handle:
        k = int(read_h5_attrs(handle)["num_concepts"])
        bottom_up = BottomUp(store, np.asarray(manifest.indices(config.data.train_split)), k,
                             seed=config.evaluate.bottom_up_seed)
        sources = {
            "model": model_scores,
            "pseudo_labels": lambda i: cam_scores(handle, i),
            "bottom_up": lambda i: bottom_up.scores(read_rows(store, "patch", i)),
        }
        clusters = {"model": model_scores.num_clusters, "pseudo_labels": k, "bottom_up": k}
        rows = evaluate_rows(manifest, labelled, sources, clusters, train_size=size,
                             protocol=config.evaluate.protocol,
                             crf=frozenset({"model"} if config.evaluate.crf else ()))
    metrics = {name: {key: row[key] for key in ("miou", "pixel_accuracy", "per_class_iou", "num_clusters",
                                                   "protocol", "num_pixels")} for name, row in rows.items()}
    metrics["evaluation"] = info
    plots = config.path("plots")
    for name, row in rows.items():
        plot_confusion(row, manifest.class_names, plots / f"confusion_{name}.png", name)
    write_json(config.path("matching"), {name: row["matching"] for name, row in rows.items()})
    write_json(config.path("metrics"), metrics)
    log(f"evaluate: wrote {config.path('metrics')} and {plots}/ "
        f"({json.dumps({n: round(r['miou'], 2) for n, r in rows.items()})})")
