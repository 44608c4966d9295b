"""Typed view of `params.yaml`.

Each stage reads one section. Unknown keys are errors (a typo in params.yaml must not
silently fall back to a default), and every dotted key can be overridden from the
command line with `--set section.key=value` (YAML syntax for the value), the same
way `dvc exp run --set-param` does.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError
from pipeline.layout import artifact_path


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
    crop_stride: float = 0.5            # stride as a fraction of the window side ("even" windows)
    # "even": square windows of fraction x the shorter side every crop_stride x side, plus one
    # flush with the far border; "reference": models/utils/bbox_anchors.py's windows on the patch
    # grid of the concept-scale image (2-6% larger, the positions of the reference).
    windows: str = "even"
    crop_size: int = 320                # every crop is resized to crop_size x crop_size
    pools: list[str] = field(default_factory=lambda: ["thing", "stuff"])  # thing, stuff, all
    thing_fraction: float = 0.5         # thing crop: more than this share is foreground
    stuff_fraction: float = 0.8         # stuff crop: more than this share is background
    # Foreground mask that classes the windows: "upsampled" = saliency of the training-size pass,
    # upsampled (bilinear) to the concept scale and thresholded at its mean (no extra pass);
    # "concept_scale" = the reference's (cocostuff_crop.py): the [CLS] attention of a forward
    # pass at the concept scale (80x80 for COCO), thresholded at its mean on the patch grid,
    # nearest-upsampled to the pixels.
    foreground: str = "upsampled"
    # Images per shard of the store: one file per array per shard, the unit of work and of resume.
    chunk_images: int = 64
    # Training-split patch vectors kept for the bottom-up baseline's k-means: at least this many
    # (the same number from each image, rounded up, seeded by image), unless every patch is
    # fewer: patch features are stored whole for the evaluation split only, as nothing else reads them.
    bottom_up_samples: int = 200_000

    def __post_init__(self) -> None:
        _check_choice("foreground", self.foreground, ("upsampled", "concept_scale"))
        _check_choice("windows", self.windows, ("even", "reference"))
        _check_at_least(self, 1, "chunk_images", "bottom_up_samples")


@dataclass
class ConceptsConfig:
    k: dict = field(default_factory=lambda: {"thing": 12, "stuff": 15})  # clusters per pool
    iterations: int = 100
    restarts: int = 1                   # k-means runs from different seeds; the best objective is kept
    seed: int = 0
    # Crops k-means is trained on: None = every crop of the pool (the reference: faiss' subsampling
    # off); n = a random k x n of them (faiss' subsampling). Every crop is assigned either way.
    max_points_per_centroid: int | None = None
    normalize: bool = False             # L2-normalise crop embeddings before k-means
    # faiss (k-means, reference COCO-Stuff and VOC) | minibatch (sklearn MiniBatchKMeans, reference
    # Cityscapes and LIP; restarts = its n_init)
    algorithm: str = "faiss"
    recompute_centroids: bool = True    # each centroid = mean of the crops assigned to it, as the reference

    def __post_init__(self) -> None:
        _check_choice("algorithm", self.algorithm, ("faiss", "minibatch"))
        if self.max_points_per_centroid is not None and not (
                isinstance(self.max_points_per_centroid, int) and not isinstance(self.max_points_per_centroid, bool)
                and self.max_points_per_centroid >= 1):
            raise ValueError(f"max_points_per_centroid must be a positive integer or null (every crop), "
                             f"got {self.max_points_per_centroid!r}")


@dataclass
class PseudoLabelsConfig:
    mass: float = 0.8                   # gradient mass kept by the binarisation
    background: bool = False            # object-centric sets add relu(threshold - max CAM)
    background_threshold: float = 0.1
    batch_size: int = 8
    # Factor on the concept loss's gradient against the attention term (ViT CAMs). Here each
    # image's loss is its own; the reference averaged it over its batch of B images, i.e.
    # grad_scale = 1/B (B = 8 for COCO and VOC, 2 for Cityscapes and LIP: Command.md).
    grad_scale: float = 1.0
    # dtype of the stored CAMs (pseudolabels.h5 `cam`). A ViT CAM is attn / max(attn) plus a small
    # gradient term: float16 (11 significant bits) ties or flips the argmax of many pixels
    # (benchmarks/bench_cam_precision.py); float32 stores exactly what was computed.
    # How CAMs are stored: float32 | float16 | uint16 (each image's CAMs over their maximum, in
    # steps of 1/65535: the size of float16, finer near the maximum; store.create_pseudolabel_file)
    cam_dtype: str = "float32"
    # On CUDA, run the part of the CAM pass that needs no gradient (ViT blocks 1..L-1, the CNN
    # trunk) under bf16 autocast; the last block, the loss and its gradient stay float32.
    # Off by default: it moves the argmax of near-tied CAM pixels (make bench-cam-precision).
    frozen_bf16: bool = False

    def __post_init__(self) -> None:
        _check_choice("cam_dtype", self.cam_dtype, ("float32", "float16", "uint16"))


@dataclass
class EvaluateConfig:
    protocol: str = "reference"         # reference | native | stego (`transfgu protocols`)
    crf: bool = False                   # dense-CRF refinement of the model row (needs the [crf] extra)
    flip: bool = False                  # model row: mean of the logits and those of the flipped image, flipped back (STEGO)
    batch_size: int = 16
    bottom_up_seed: int = 0


@dataclass
class JobqueueConfig:
    """The SLURM cluster of `compute.cluster: slurm` (dask-jobqueue): `jobs` batch jobs, each
    running one dask worker process per GPU (pipeline.compute.slurm_cluster)."""
    jobs: int = 1                       # batch jobs asked for
    queue: str | None = None            # partition (#SBATCH -p)
    account: str | None = None          # #SBATCH -A
    cores: int = 8                      # CPU cores per job (--cpus-per-task), shared by its workers
    memory: str = "32GiB"               # memory per job (--mem; GiB, as SLURM counts), shared by its workers
    gpus_per_job: int = 1               # --gres=gpu:N and N worker processes, one per GPU; 0 = CPU jobs
    processes: int = 1                  # worker processes per job when gpus_per_job is 0
    walltime: str = "04:00:00"          # #SBATCH -t
    job_extra_directives: list[str] = field(default_factory=list)   # more #SBATCH options ("--constraint=a100")
    job_script_prologue: list[str] = field(default_factory=list)    # shell lines run before the workers start
    python: str | None = None           # the workers' python; None = this one (a venv on a shared file system)
    interface: str | None = None        # the workers' network interface (e.g. ib0); None = the default route
    log_directory: str | None = None    # where the jobs' stdout and stderr go; None = the submit folder

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "jobs", "cores", "processes")
        _check_at_least(self, 0, "gpus_per_job")
        for name in ("job_extra_directives", "job_script_prologue"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r}")


@dataclass
class ComputeConfig:
    """Where the per-image shards of `features` and `pseudolabels` run (pipeline/compute.py).

    No stage lists this section as a DVC param: the executor never changes an artifact, so
    changing it never reruns a stage.
    """
    scheduler: str = "local"            # local: in this process, in order | dask: shards as dask tasks
    address: str | None = None          # an existing dask scheduler (tcp://host:8786); None = start a cluster
    cluster: str = "local"              # the cluster started when there is no address: local | slurm
    workers: int = 2                    # local cluster: worker processes
    threads_per_worker: int = 1         # shards one worker runs at once (local and slurm)
    gpus: int = 0                       # local cluster: GPUs its workers are spread over (worker i -> GPU i mod gpus)
    # Local cluster: torch threads per worker. None: on CPU workers as many as the stage's own
    # process uses (CPU results depend on the thread count: the same count gives the in-process
    # run's arrays bit for bit), on GPU workers their share of the cores. A smaller number is
    # faster on a CPU cluster but moves the last bits, so DVC sees the outputs changed.
    torch_threads: int | None = None
    # A shard that raises (other than a bad input file) or whose worker dies is run again up to
    # this many times; worker deaths are counted by the scheduler, so only clusters this run
    # starts follow it (an existing scheduler keeps its distributed.scheduler.allowed-failures).
    retries: int = 2
    jobqueue: JobqueueConfig = field(default_factory=JobqueueConfig)

    def __post_init__(self) -> None:
        _check_choice("scheduler", self.scheduler, ("local", "dask"))
        _check_choice("cluster", self.cluster, ("local", "slurm"))
        _check_at_least(self, 1, "workers", "threads_per_worker", "torch_threads")
        _check_at_least(self, 0, "gpus", "retries")


@dataclass
class TrainConfig:
    """Every training constant of the method; defaults = paper / reference (COCO-Stuff-27).

    Per-dataset values live in pipeline/settings.py (method.md's table).
    """

    # optimisation
    epochs: int = 200
    lr: float = 1e-4
    batch_size: int = 256
    # An epoch is `repeat` shuffled passes over the training set, in batches of batch_size; the
    # last partial batch is dropped when drop_last (reference: ConcatDataset of `repeat` copies
    # with repeat 20 for Cityscapes and VOC, DataLoader(drop_last=True) in every *_trainval.py).
    repeat: int = 1
    drop_last: bool = True
    # Size (H, W) the training images are read at; None = features.image_size, the size the
    # CAMs were computed at (they are cropped onto each augmented crop's patch grid either way).
    # LIP-5/16 train at 480x240 on CAMs of 640x320 (reference: lip_trainval.py resize 240).
    image_size: list[int] | None = None
    weight_decay: float = 5e-4          # Adam L2; biases and 1-D (norm) parameters are exempt
    grad_clip_value: float = 1.0        # element-wise clamp of every gradient to +-value
    # decoder (paper: 2 blocks, 6 heads, d = backbone width, dropout 0.1)
    decoder_layers: int = 2
    decoder_heads: int = 6
    decoder_dim: int | None = None
    decoder_dropout: float = 0.1
    decoder_token_init: str = "orthogonal"   # orthogonal | reference (the reference decoder's init)
    # augmentation
    crop_scale: tuple[float, float] = (0.4, 0.9)   # crop SIDE fraction of the image side, aspect kept
    crop_scale_step: float | None = None  # None: side ~ U(crop_scale); 0.1: the reference's {0.4, ..., 0.9}
    crop_output_fraction: float = 0.5   # crop resized to this fraction of the training size
    jitter_p: float = 0.3
    jitter_strength: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (1.0, 2.0)
    hflip: bool = True                  # each sample flipped with p = 0.5
    # losses
    cam_norm: str = "image"             # min-max of the CAMs: per image over all K (reference) or per "concept"
    uncertainty_weight: float = 0.3
    diversity_weight: float = 1.0
    # bootstrapping
    bootstrap: bool = True
    bootstrap_start: int = 2            # 0-based epoch; always a teacher-update epoch
    teacher_interval: int | list[int] = 2
    teacher_interval_block: int = 10    # epochs covered by each entry of a teacher_interval list
    teacher_mix: float = 0.5            # weight of softmax(teacher) in the bootstrapped target
    peer_alpha_start: float = 0.03
    peer_alpha_end: float = 0.10
    peer_alpha_step: float = 0.01       # per epoch since the last teacher update
    reset_optimizer: bool = False       # reference keeps Adam's state across student resets
    predict_with: str = "student"       # model.pt holds the student (what the reference evaluates) or "teacher"
    # run
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"                # "auto" = backbone.device
    # Decode the training images once, at the training size, into cache/model/train_images.npy
    # (uint8, memory-mapped) and read them from there: about 50x cheaper than decoding a JPEG
    # per sample (benchmarks/bench_loader.py). Costs N x H x W x 3 bytes of disk.
    image_cache: bool = True

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        self.jitter_strength = tuple(float(v) for v in self.jitter_strength)  # type: ignore[assignment]
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        self.teacher_interval = _parse_intervals(self.teacher_interval)
        lo, hi = self.crop_scale
        if not (len(self.crop_scale) == 2 and 0 < lo <= hi <= 1):
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {list(self.crop_scale)}")
        if not 0 < self.crop_output_fraction <= 1:
            raise ValueError(f"crop_output_fraction must be in (0, 1], got {self.crop_output_fraction}")
        if len(self.jitter_strength) != 4:
            raise ValueError(f"jitter_strength needs 4 values, got {list(self.jitter_strength)}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "teacher_mix"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and positive, got {self.blur_kernel}")
        _check_choice("cam_norm", self.cam_norm, ("image", "concept"))
        _check_choice("decoder_token_init", self.decoder_token_init, ("orthogonal", "reference"))
        _check_choice("predict_with", self.predict_with, ("student", "teacher"))
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip_value < 0:
            raise ValueError(f"lr must be > 0, weight_decay and grad_clip_value >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.grad_clip_value}")
        if self.epochs < 0 or self.bootstrap_start < 0:
            raise ValueError(f"epochs and bootstrap_start must be >= 0, got {self.epochs}, {self.bootstrap_start}")
        if self.batch_size < 1 or self.teacher_interval_block < 1 or self.repeat < 1:
            raise ValueError(f"batch_size, teacher_interval_block and repeat must be >= 1, "
                             f"got {self.batch_size}, {self.teacher_interval_block}, {self.repeat}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check_at_least(section: Any, low: int, *names: str) -> None:
    """Each of `names` of `section` is at least `low` (None, where a key allows it, passes)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _parse_intervals(value: Any) -> int | list[int]:
    """Accepts 2, [3, 3, 3, 2] or the reference's "3,3,3,2"."""
    if isinstance(value, str):
        value = [int(v) for v in value.split(",") if v.strip()]
    values = [int(value)] if isinstance(value, numbers.Integral) else [int(v) for v in value]
    if not values or min(values) < 1:
        raise ValueError(f"teacher_interval must be positive integers, got {value!r}")
    return values[0] if len(values) == 1 else values


@dataclass
class Config:
    setting: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    pseudolabels: PseudoLabelsConfig = field(default_factory=PseudoLabelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)   # the executor: no stage's DVC param
    cache: str = "cache"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache)

    def path(self, artifact: str) -> Path:
        """Where artifact `artifact` (a name of pipeline.layout.ARTIFACTS) lives under the cache."""
        return artifact_path(self.cache_dir, artifact)

    @property
    def image_size(self) -> tuple[int, int]:
        """The training size (H, W) every stage after `features` works at."""
        h, w = self.features.image_size
        return int(h), int(w)


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
        hints_ = [f"'{u}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(u, names, n=1)) else "")
                  for u in unknown]
        raise InputError(source, f"unknown key(s) in '{where or 'the top level'}': {', '.join(hints_)}; "
                                 f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        _check_type(hints[name], value, key, source)
        kwargs[name] = _build(hints[name], value, key, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(source, f"'{where}': {exc}") from None


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(hint: Any, value: Any, key: str, source: str) -> None:
    """A scalar field given a value of another type (`--set train.epochs=abc`) is an error that
    names the key; containers and unions of other kinds are checked by the dataclasses."""
    allowed = [h for h in typing.get_args(hint)] if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else [hint]
    if value is None and type(None) in allowed:
        return
    scalars = [h for h in allowed if h in _SCALARS]
    if not scalars or len(scalars) != len([h for h in allowed if h is not type(None)]):
        return
    fits = any(isinstance(value, h) and not (h in (int, float) and isinstance(value, bool)) or
               (h is float and isinstance(value, int) and not isinstance(value, bool)) for h in scalars)
    if not fits:
        raise InputError(source, f"'{key}' must be {' or '.join(_SCALARS[h] for h in scalars)}"
                                 f"{' or null' if type(None) in allowed else ''}; got {value!r}")


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
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    source = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
    return _build(Config, raw, "", source)


def config_from_params(raw: dict, source: str) -> Config:
    """A Config from params as a dict (a setting's, `SETTINGS.get(name).params()`); `source` names
    them in errors."""
    return _build(Config, raw, "", source)
