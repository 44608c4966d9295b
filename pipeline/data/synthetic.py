"""A small, deterministic synthetic segmentation dataset of outdoor-like scenes.

Each image is two or three horizontal "stuff" bands with wavy borders (sky on top when
present, then grass / water / road in random order) with one to four "thing" objects on
top (disc, box, triangle) of varied size, position and rotation. Every class has its own
colour pair *and* texture (smooth clouds, vertical grass streaks, horizontal ripples,
fine grain, polka dots, checkerboard, diagonal stripes), so a frozen ImageNet CNN can
tell them apart at stride 16; per-image hue, brightness and contrast jitter keep colour
alone from being a trivial cue.

Output of :func:`generate_synthetic`::

    images/<id>.png  RGB          labels/<id>.png  8-bit class ids (no ignore pixels)
    train.txt, val.txt  one id per line      classes.txt  one class name per line
    meta.json  generator parameters
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.files import atomic_write, commit, partial_path, remove
from pipeline.runtime import log

GENERATOR_VERSION = 1

Pattern = Callable[[np.random.Generator, "Grid"], np.ndarray]


@dataclass(frozen=True)
class Grid:
    """Pixel coordinates shared by every pattern of one image size."""

    y: np.ndarray  # (H, W) float32 row index
    x: np.ndarray  # (H, W) float32 column index

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape  # type: ignore[return-value]

    @classmethod
    def of(cls, size: tuple[int, int]) -> "Grid":
        y, x = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
        return cls(y, x)


@dataclass(frozen=True)
class SyntheticClass:
    """A semantic class: how it is placed (stuff band or thing shape), coloured and textured."""

    name: str
    kind: str                           # "stuff" or "thing"
    dark: tuple[float, float, float]    # RGB at pattern value 0
    light: tuple[float, float, float]   # RGB at pattern value 1
    pattern: Pattern                    # (rng, grid) -> (H, W) values in [0, 1]


# ----------------------------------------------------------------------------- patterns
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Value noise: a coarse random grid bicubically upsampled to ``shape``, in [0, 1]."""
    coarse = rng.random(cells, dtype=np.float32)
    up = Image.fromarray(coarse).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(up), 0.0, 1.0)


def _clouds(rng: np.random.Generator, g: Grid) -> np.ndarray:
    h, w = g.shape
    n = _smooth_noise(rng, (h, w), (4, 5))
    # Puffy white patches on a blue that lightens toward the horizon: low-frequency only.
    return np.clip((n - 0.5) * 2.5, 0.0, 1.0) * 0.8 + 0.25 * (g.y / h)


def _grass(rng: np.random.Generator, g: Grid) -> np.ndarray:
    h, w = g.shape
    stretch = int(rng.integers(6, 11))
    blades = _smooth_noise(rng, (h, w), (max(2, h // stretch), max(2, int(w / rng.uniform(1.2, 1.8)))))
    return 0.25 + 0.75 * blades  # vertical streaks: high frequency across, low along


def _ripples(rng: np.random.Generator, g: Grid) -> np.ndarray:
    h, w = g.shape
    wavelength = rng.uniform(6.0, 10.0)
    warp = _smooth_noise(rng, (h, w), (3, 4)) * rng.uniform(1.0, 2.0)
    phase = 2 * math.pi * (g.y / wavelength + warp + 0.05 * np.sin(2 * math.pi * g.x / rng.uniform(40, 80)))
    return 0.5 + 0.5 * np.sin(phase)


def _grain(rng: np.random.Generator, g: Grid) -> np.ndarray:
    h, w = g.shape
    fine = rng.random(((h + 1) // 2, (w + 1) // 2), dtype=np.float32)
    fine = np.repeat(np.repeat(fine, 2, axis=0), 2, axis=1)[:h, :w]
    return 0.3 + 0.4 * fine + 0.3 * _smooth_noise(rng, (h, w), (6, 6))


def _rotated(rng: np.random.Generator, g: Grid, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(rng.uniform(-max_deg, max_deg))
    return g.x * math.cos(a) + g.y * math.sin(a), -g.x * math.sin(a) + g.y * math.cos(a)


def _dots(rng: np.random.Generator, g: Grid) -> np.ndarray:
    period = rng.uniform(10.0, 15.0)
    u, v = _rotated(rng, g, 30)
    s = np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)
    return np.clip((s - 0.25) * 4.0, 0.0, 1.0)


def _checker(rng: np.random.Generator, g: Grid) -> np.ndarray:
    cell = rng.uniform(6.0, 10.0)
    u, v = _rotated(rng, g, 20)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _stripes(rng: np.random.Generator, g: Grid) -> np.ndarray:
    period = rng.uniform(8.0, 12.0)
    a = math.radians(45 + rng.uniform(-15, 15))
    return 0.5 + 0.5 * np.sin(2 * math.pi * (g.x * math.cos(a) + g.y * math.sin(a)) / period)


SYNTHETIC_CLASSES: tuple[SyntheticClass, ...] = (
    SyntheticClass("sky", "stuff", (0.42, 0.62, 0.90), (0.95, 0.96, 0.99), _clouds),
    SyntheticClass("grass", "stuff", (0.10, 0.30, 0.06), (0.50, 0.74, 0.22), _grass),
    SyntheticClass("water", "stuff", (0.04, 0.18, 0.38), (0.30, 0.58, 0.72), _ripples),
    SyntheticClass("road", "stuff", (0.22, 0.22, 0.24), (0.62, 0.61, 0.60), _grain),
    SyntheticClass("disc", "thing", (0.80, 0.12, 0.10), (0.98, 0.86, 0.30), _dots),
    SyntheticClass("box", "thing", (0.45, 0.25, 0.08), (0.92, 0.74, 0.45), _checker),
    SyntheticClass("triangle", "thing", (0.30, 0.08, 0.45), (0.86, 0.62, 0.96), _stripes),
)
CLASS_NAMES: list[str] = [c.name for c in SYNTHETIC_CLASSES]
_INDEX = {c.name: i for i, c in enumerate(SYNTHETIC_CLASSES)}


# ----------------------------------------------------------------------------- layout
def _stuff_layout(rng: np.random.Generator, g: Grid) -> np.ndarray:
    """Label map of 2-3 horizontal bands with wavy borders."""
    h, w = g.shape
    ground = ["grass", "water", "road"]
    rng.shuffle(ground)
    n_bands = int(rng.integers(2, 4))
    bands = (["sky"] if rng.random() < 0.75 else []) + ground
    bands = bands[:n_bands]
    fractions = np.sort(rng.uniform(0.2, 0.85, size=len(bands) - 1))
    for _ in range(8):  # keep bands at least ~12% of the height apart
        if len(fractions) < 2 or np.diff(fractions).min() > 0.12:
            break
        fractions = np.sort(rng.uniform(0.2, 0.85, size=len(bands) - 1))
    labels = np.full((h, w), _INDEX[bands[0]], dtype=np.uint8)
    x = g.x[0]
    for frac, name in zip(fractions, bands[1:]):
        amp = rng.uniform(0.01, 0.06) * h
        cycles = rng.uniform(0.5, 3.0)
        wobble = np.interp(x, np.linspace(0, w - 1, 9), rng.normal(0, 0.015 * h, 9))
        border = frac * h + amp * np.sin(2 * math.pi * cycles * x / w + rng.uniform(0, 2 * math.pi)) + wobble
        labels[g.y > border[None, :]] = _INDEX[name]
    return labels


def _shape_polygon(rng: np.random.Generator, name: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if name == "triangle":
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        radii = r * rng.uniform(0.9, 1.25, 3)
    else:  # box: a rectangle rotated by up to 25 degrees
        half_w, half_h = r * rng.uniform(0.7, 1.15), r * rng.uniform(0.7, 1.15)
        corner = math.atan2(half_h, half_w)
        rot = math.radians(rng.uniform(-25, 25))
        angles = rot + np.array([corner, math.pi - corner, math.pi + corner, -corner])
        radii = np.full(4, math.hypot(half_w, half_h))
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in zip(angles, radii)]


def _place_things(rng: np.random.Generator, labels: np.ndarray) -> None:
    """Draw 1-4 thing objects onto ``labels`` in place (later ones occlude earlier ones)."""
    h, w = labels.shape
    things = [c.name for c in SYNTHETIC_CLASSES if c.kind == "thing"]
    for _ in range(int(rng.integers(1, 5))):
        name = things[int(rng.integers(len(things)))]
        r = rng.uniform(0.10, 0.28) * min(h, w)
        cx, cy = rng.uniform(0.12, 0.88) * w, rng.uniform(0.15, 0.88) * h
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        if name == "disc":
            stretch = rng.uniform(0.8, 1.25)
            draw.ellipse([cx - r * stretch, cy - r / stretch, cx + r * stretch, cy + r / stretch], fill=1)
        else:
            draw.polygon(_shape_polygon(rng, name, cx, cy, r), fill=1)
        labels[np.asarray(mask, dtype=bool)] = _INDEX[name]


# ----------------------------------------------------------------------------- rendering
def _hue_rotation(angle: float) -> np.ndarray:
    """RGB matrix rotating colours by ``angle`` radians about the grey axis."""
    c, s = math.cos(angle), math.sin(angle)
    k = 1.0 / 3.0
    r3 = math.sqrt(k)
    return np.array([
        [c + (1 - c) * k, k * (1 - c) - r3 * s, k * (1 - c) + r3 * s],
        [k * (1 - c) + r3 * s, c + k * (1 - c), k * (1 - c) - r3 * s],
        [k * (1 - c) - r3 * s, k * (1 - c) + r3 * s, c + k * (1 - c)],
    ], dtype=np.float32)


def render_scene(rng: np.random.Generator, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(H, W, 3)`` uint8 and its label map ``(H, W)`` uint8."""
    labels = _stuff_layout(rng, grid)
    _place_things(rng, labels)
    h, w = grid.shape
    present = np.unique(labels)
    dark = np.zeros((len(SYNTHETIC_CLASSES), 3), dtype=np.float32)
    light = np.zeros_like(dark)
    t = np.zeros((h, w), dtype=np.float32)
    for idx in present:
        cls = SYNTHETIC_CLASSES[int(idx)]
        jitter = rng.uniform(-0.04, 0.04, size=(2, 3)).astype(np.float32)
        dark[idx] = np.asarray(cls.dark, dtype=np.float32) + jitter[0]
        light[idx] = np.asarray(cls.light, dtype=np.float32) + jitter[1]
        where = labels == idx
        t[where] = cls.pattern(rng, grid)[where]
    image = dark[labels] + t[..., None] * (light - dark)[labels]
    # Per-image photometric jitter: colour shifts, but class contrasts stay.
    image = image @ _hue_rotation(rng.uniform(-0.25, 0.25)).T
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.85, 1.15)
    image += 0.015 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), labels


NOT_GENERATED = "NOT_GENERATED.txt"      # the only file of a synthesize output for another dataset


def _looks_generated(folder: Path) -> bool:
    """An earlier output of this generator (scenes or placeholder), or an empty folder: safe to replace."""
    return (((folder / "classes.txt").is_file() and (folder / "images").is_dir())
            or [p.name for p in folder.iterdir()] in ([], [NOT_GENERATED]))


def generate_synthetic(out_dir: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (224, 224),
                       seed: int = 0) -> None:
    """Write the synthetic dataset to ``out_dir`` (replaced atomically); same seed, same bytes.

    Image ``i`` of a split depends only on ``(seed, split, i)``, so changing ``n_val``
    does not change the training images.
    """
    out_dir = Path(out_dir)
    height, width = int(size[0]), int(size[1])
    if n_train < 0 or n_val < 0 or height < 16 or width < 16:
        raise ValueError(f"need n_train, n_val >= 0 and size >= 16x16, got {n_train}, {n_val}, {size}")
    if out_dir.exists() and not (out_dir.is_dir() and _looks_generated(out_dir)):
        raise InputError(out_dir, "exists and is not a synthetic dataset folder; refusing to overwrite it")
    tmp = partial_path(out_dir)
    remove(tmp)
    (tmp / "images").mkdir(parents=True)
    (tmp / "labels").mkdir()
    grid = Grid.of((height, width))
    try:
        for split_code, (split, count) in enumerate((("train", n_train), ("val", n_val))):
            ids = [f"{split}_{i:05d}" for i in range(count)]
            for i, image_id in enumerate(ids):
                rng = np.random.default_rng([int(seed), split_code, i])
                image, labels = render_scene(rng, grid)
                Image.fromarray(image).save(tmp / "images" / f"{image_id}.png", compress_level=1)
                Image.fromarray(labels).save(tmp / "labels" / f"{image_id}.png", compress_level=1)
            (tmp / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (tmp / "classes.txt").write_text("".join(f"{n}\n" for n in CLASS_NAMES))
        meta = {"generator": "pipeline.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
                "size": [height, width], "n_train": int(n_train), "n_val": int(n_val),
                "classes": [{"name": c.name, "kind": c.kind} for c in SYNTHETIC_CLASSES]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        commit(tmp, out_dir)
    finally:
        remove(tmp)


def synthesize_stage(config: Config) -> None:
    """Stage `synthesize`: the deterministic demo dataset at `synthetic.out`, only when it is the
    dataset in use (`data.dataset: synthetic`); otherwise a placeholder folder saying so (DVC
    needs the stage's output to exist)."""
    cfg = config.synthetic
    if config.data.dataset != "synthetic":
        out = Path(cfg.out)
        if out.exists() and not (out.is_dir() and _looks_generated(out)):
            raise InputError(out, "exists and is not a synthetic dataset folder; refusing to overwrite it")
        tmp = partial_path(out)
        remove(tmp)
        atomic_write(tmp / NOT_GENERATED, f"The synthetic demo scenes are generated only when data.dataset is "
                                          f"'synthetic'; this run uses '{config.data.dataset}'.\n")
        commit(tmp, out)
        log(f"synthesize: skipped, data.dataset is '{config.data.dataset}' (placeholder {out / NOT_GENERATED})")
        return
    generate_synthetic(cfg.out, n_train=cfg.n_train, n_val=cfg.n_val, size=tuple(cfg.size), seed=cfg.seed)
    log(f"synthesize: {cfg.n_train} train + {cfg.n_val} val images of {cfg.size[0]}x{cfg.size[1]} in {cfg.out}")
