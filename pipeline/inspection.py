"""Pictures of the intermediate artifacts, as PNGs: `transfgu inspect features|concepts|pseudolabels|predictions`.

Each plot function takes an `Artifacts` view (pipeline.artifacts), writes its PNGs
atomically under `out_dir` and returns their paths; the click group `inspect_group`
wraps them and prints the paths. Figures are built with `matplotlib.figure.Figure`
on the Agg canvas, never through pyplot, so importing this module in a notebook
leaves the notebook's own backend alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import click
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.artifacts import Artifacts, open_artifacts
from pipeline.errors import InputError, ProvenanceError
from pipeline.files import atomic_write
from pipeline.runtime import progress

MAX_SIDE = 384                       # display size of the longer image side, pixels
IGNORE_COLOUR = (0, 0, 0)
UNMATCHED_COLOUR = (150, 150, 150)


# ----------------------------------------------------------------------------- small helpers
def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as PNG under a temporary name and rename it: a reader never sees half a file."""
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))


def file_stem(index: int, image_id: str) -> str:
    """`<index>_<id>` with anything but [A-Za-z0-9._-] replaced, so ids with slashes stay one file."""
    return f"{index:06d}_{re.sub(r'[^A-Za-z0-9._-]+', '-', image_id).strip('-')[:80]}"


def display_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(H, W) with the longer side at most `max_side`, aspect kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def upsample_nearest(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map (h, w) of any integer dtype to `size` (H, W)."""
    h, w = ids.shape
    rows = np.minimum(np.arange(size[0]) * h // size[0], h - 1)
    cols = np.minimum(np.arange(size[1]) * w // size[1], w - 1)
    return ids[rows][:, cols]


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours: tab20, tab20b, tab20c, then a seeded random tail."""
    from matplotlib import colormaps

    colours = [colormaps[name](i)[:3] for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    # tab20 alternates dark/light pairs: evens first keeps the first 10 classes well apart.
    colours = colours[0:20:2] + colours[1:20:2] + colours[20:]
    rgb = (np.array(colours[:n]) * 255).round().astype(np.uint8).reshape(-1, 3)
    if n > len(rgb):
        extra = np.random.default_rng(0).integers(0, 256, size=(n - len(rgb), 3), dtype=np.uint8)
        rgb = np.concatenate([rgb, extra])
    return rgb


def colourise(ids: np.ndarray, colours: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Id map (H, W) -> RGB (H, W, 3) uint8; ids outside the palette (ignore, unmatched) are black."""
    out = np.zeros((*ids.shape, 3), dtype=np.uint8)
    inside = (ids >= 0) & (ids < len(colours)) & (ids != ignore)
    out[inside] = colours[ids[inside]]
    return out


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def _axis(ax, title: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _shown_image(art: Artifacts, index: int, max_side: int) -> np.ndarray:
    record = art.manifest.records[index]
    return art.image(index, display_size(record.height, record.width, max_side))


# ----------------------------------------------------------------------------- features
def pca_rgb(patches: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Patch features (n, h, w, D) -> (n, h, w, 3) in [0, 1]: the first 3 principal components
    fitted over all n images together (so colours compare across them), each stretched
    between its 1st and 99th percentile."""
    n, h, w, d = patches.shape
    x = patches.reshape(-1, d).astype(np.float64)
    x -= x.mean(0)
    _, vectors = np.linalg.eigh(x.T @ x)
    top = vectors[:, ::-1][:, :3]
    # eigh's sign is arbitrary: fix it so reruns give the same colours
    top *= np.sign(top[np.abs(top).argmax(0), range(top.shape[1])])
    proj = x @ top
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    low, high = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - low) / np.maximum(high - low, eps), 0, 1)
    return rgb.reshape(n, h, w, 3).astype(np.float32)


def plot_features(art: Artifacts, indices: Sequence[int], out_dir: str | Path, *,
                  max_side: int = MAX_SIDE, show_progress: bool = True) -> list[Path]:
    """Per image: image | patch features by PCA (fitted over `indices`) | saliency. One PNG each."""
    if not indices:
        raise ValueError("no images chosen")
    store = art.feature_store
    rgb = pca_rgb(art.patch_features(indices))          # computed for images the store does not hold
    # ViTs store the [CLS] attention, CNNs the feature norm (pipeline.backbones.BackboneOutput)
    saliency_title = ("saliency: [CLS] attention" if "vit" in str(art.feature_attrs.get("backbone", ""))
                      else "saliency: feature norm")
    paths = []
    for j, index in enumerate(progress(indices, desc="inspect features", enabled=show_progress)):
        image = _shown_image(art, index, max_side)
        H, W = image.shape[:2]
        saliency = np.asarray(store["saliency"][index], dtype=np.float32)
        fig = Figure(figsize=(9, 3.3))
        axes = fig.subplots(1, 3)
        axes[0].imshow(image)
        _axis(axes[0], f"{art.image_ids[index]} (#{index})")
        axes[1].imshow(rgb[j], interpolation="nearest", extent=(0, W, H, 0))
        _axis(axes[1], f"patch features, PCA over {len(indices)} image(s)")
        axes[2].imshow(image)
        heat = axes[2].imshow(saliency, cmap="inferno", alpha=0.65, interpolation="bilinear", extent=(0, W, H, 0))
        fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02)
        _axis(axes[2], saliency_title)
        fig.tight_layout()
        paths.append(save_figure(fig, Path(out_dir) / f"{file_stem(index, art.image_ids[index])}.png"))
    return paths


# ----------------------------------------------------------------------------- concepts
def plot_concept_gallery(art: Artifacts, concept: int, path: str | Path, *, n: int = 16,
                         crop_size: int = 96) -> Path:
    """Grid of the `n` crops nearest the centroid of `concept`, titled with its pool and size."""
    members = art.concept_members(concept, nearest=n)
    size = int(art.concepts.sizes[concept])
    cols = int(np.ceil(np.sqrt(max(n, 1))))
    rows = max(1, int(np.ceil(min(n, max(len(members), 1)) / cols)))
    fig = Figure(figsize=(1.3 * cols, 1.3 * rows + 0.45))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, image, box in zip(axes, members.images, members.boxes):
        ax.imshow(art.crop(image, box, crop_size))
    for ax in axes:
        _axis(ax)
        ax.axis("off")
    if not len(members):
        axes[0].text(0.5, 0.5, "no crops", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(f"concept {concept} ({members.pool}): {size} crops", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def projection_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA to 2-D: (projected (n, 2), mean (D,), components (D, 2))."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    _, vectors = np.linalg.eigh((x - mean).T @ (x - mean))
    components = vectors[:, ::-1][:, :2]
    return (x - mean) @ components, mean, components


def sample_crop_rows(art: Artifacts, max_points: int, seed: int = 0) -> np.ndarray:
    """Assigned crop rows, at most about `max_points`, drawn as whole images' blocks of rows
    (one chunk read each) rather than scattered rows (one chunk read per row)."""
    assignment = art.concepts.assignment
    per = max(int(art.feature_attrs.get("windows_per_image", 1)), 1)
    blocks = np.random.default_rng(seed).permutation(int(np.ceil(len(assignment) / per)))
    rows, total = [], 0
    for b in blocks:
        block = np.arange(b * per, min((b + 1) * per, len(assignment)))
        block = block[assignment[block] >= 0]
        rows.append(block)
        total += len(block)
        if total >= max_points:
            break
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def plot_concept_projection(art: Artifacts, path: str | Path, *, max_points: int = 20000, seed: int = 0) -> Path:
    """2-D PCA of the crop embeddings coloured by concept, centroids marked with their number."""
    concepts = art.concepts
    rows = sample_crop_rows(art, max_points, seed)
    x = art.feature_store["crops/embedding"].get_orthogonal_selection((rows, slice(None))) \
        if len(rows) else np.zeros((0, concepts.centroids.shape[1]), dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    if concepts.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    colours = palette(concepts.k) / 255.0
    if len(x) >= 2:
        xy, mean, components = projection_2d(x)
        labels = concepts.assignment[rows]
        dot = float(np.clip(4000 / len(xy), 2, 25))       # visible for a few crops, no blob for many
        ax.scatter(xy[:, 0], xy[:, 1], c=colours[labels], s=dot, alpha=0.6, linewidths=0)
        centres = (concepts.centroids - mean) @ components
        for c, (cx, cy) in enumerate(centres):
            ax.scatter([cx], [cy], color=colours[c], marker="X", s=90, edgecolors="black", linewidths=0.8)
            ax.annotate(str(c), (cx, cy), xytext=(4, 4), textcoords="offset points", fontsize=8)
    handles = [Patch(color=colours[c], label=f"{c} {concepts.pools[c]} ({int(concepts.sizes[c])})")
               for c in range(concepts.k)]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    n_assigned = int((concepts.assignment >= 0).sum())
    ax.set_title(f"crop embeddings, PCA: {len(rows)} of {n_assigned} crops, x = centroid", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_concepts(art: Artifacts, out_dir: str | Path, *, per_concept: int = 16, max_points: int = 20000,
                  concepts: Sequence[int] | None = None, show_progress: bool = True) -> list[Path]:
    """`concept_<c>.png` per concept (nearest crops) and `projection.png` (all crops in 2-D)."""
    out_dir = Path(out_dir)
    chosen = range(art.concepts.k) if concepts is None else concepts
    art.crop_distances(show_progress=show_progress)
    paths = [plot_concept_gallery(art, c, out_dir / f"concept_{c:03d}.png", n=per_concept)
             for c in progress(chosen, desc="inspect concepts", unit="concept", enabled=show_progress)]
    paths.append(plot_concept_projection(art, out_dir / "projection.png", max_points=max_points))
    return paths


# ----------------------------------------------------------------------------- pseudo labels
def plot_pseudolabels(art: Artifacts, index: int, out_dir: str | Path, *, max_side: int = MAX_SIDE,
                      cols: int = 6) -> Path:
    """image | hard pseudo label overlay | one heat map per concept CAM, in a grid."""
    cam, label = art.pseudolabels(index)
    pools = art.pseudolabel_attrs.get("concept_pools") or [""] * len(cam)
    image = _shown_image(art, index, max_side)
    H, W = image.shape[:2]
    colours = palette(len(cam))
    panels = 2 + len(cam)
    cols = min(cols, panels)
    rows = int(np.ceil(panels / cols))
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows + 0.8))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    axes[0].imshow(image)
    _axis(axes[0], f"{art.image_ids[index]} (#{index})")
    axes[1].imshow(blend(image, colourise(upsample_nearest(label, (H, W)), colours, ignore=-1)))
    _axis(axes[1], "pseudo label (argmax)")
    for k in range(len(cam)):
        ax = axes[2 + k]
        ax.imshow(image)
        ax.imshow(cam[k], cmap="jet", alpha=0.5, interpolation="bilinear", extent=(0, W, H, 0))
        share = float((label == k).mean() * 100)
        _axis(ax, f"concept {k} {pools[k] if k < len(pools) else ''}: {share:.0f}%")
        for side in ax.spines.values():        # frame in the concept's label colour links map and overlay
            side.set_edgecolor(colours[k] / 255.0)
            side.set_linewidth(3)
    for ax in axes[panels:]:
        ax.axis("off")
    present = [k for k in range(len(cam)) if (label == k).any()]
    fig.legend(handles=[Patch(color=colours[k] / 255.0, label=f"concept {k}") for k in present],
               loc="lower center", ncol=min(len(present), 8) or 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, Path(out_dir) / f"{file_stem(index, art.image_ids[index])}.png")


# ----------------------------------------------------------------------------- predictions
def _prediction_maps(art: Artifacts, index: int, size: tuple[int, int], with_model: bool) -> dict[str, np.ndarray]:
    """Cluster ids at display `size` per row ('pseudo_labels', 'model'), upsampled from scores
    (bilinear, then argmax) the way the evaluate stage does."""
    import torch

    from pipeline.evaluate import PROTOCOLS, score_to_prediction

    native = PROTOCOLS.get("native")               # predictions brought to the size asked for
    train = art.model_input_size()
    maps = {"pseudo_labels": score_to_prediction(art.pseudolabel_scores(index), size, train, native)}
    if with_model:
        logits, _ = art.predictions(index)
        maps["model"] = score_to_prediction(torch.from_numpy(logits), size, train, native)
    return maps


def resolve_matching(art: Artifacts, maps: dict[int, dict[str, np.ndarray]],
                     labels: dict[int, np.ndarray | None]) -> tuple[dict[str, np.ndarray], str]:
    """Cluster -> class matching per row: the evaluate stage's (cache/plots/matching.json, over
    the whole evaluation split) when present, else fitted on the shown images only."""
    saved = art.matching
    rows = sorted({row for per in maps.values() for row in per})
    if saved and all(row in saved for row in rows):
        return {row: np.asarray(saved[row], dtype=np.int64) for row in rows}, "Hungarian matching of the evaluate stage"
    from pipeline.metrics import SegmentationMetrics

    manifest = art.manifest
    out = {}
    for row in rows:
        k = max(int(per[row].max()) + 1 for per in maps.values())
        k = max(k, art.pseudolabel_attrs.get("num_concepts", k)) if row == "pseudo_labels" else k
        meter = SegmentationMetrics(len(manifest.class_names), k, ignore_index=manifest.ignore_index)
        for index, per in maps.items():
            if labels[index] is not None:
                meter.update(per[row], labels[index])
        out[row] = meter.matching() if meter.hist.sum() else np.full(k, -1, dtype=np.int64)
    return out, "Hungarian matching fitted on the shown images only (evaluate has not run)"


def plot_predictions(art: Artifacts, indices: Sequence[int], out_dir: str | Path, *,
                     with_model: bool | None = None, max_side: int = MAX_SIDE,
                     show_progress: bool = True) -> list[Path]:
    """Per image: image | ground truth | pseudo label | model prediction, in matched class colours
    with a legend of class names; for a dataset without labels: image | pseudo label | model
    prediction in concept colours (one colour per cluster). One PNG each."""
    if with_model is None:
        with_model = art.has("model")
    manifest = art.manifest
    shown, labels, maps = {}, {}, {}
    for index in progress(indices, desc="inspect predictions", enabled=show_progress):
        image = _shown_image(art, index, max_side)
        label = art.label(index) if manifest.num_classes else None
        shown[index] = image
        labels[index] = None if label is None else upsample_nearest(label, image.shape[:2])
        maps[index] = _prediction_maps(art, index, image.shape[:2], with_model)
    if manifest.num_classes:
        matching, how = resolve_matching(art, maps, labels)
        names = list(manifest.class_names)
    else:   # nothing to match against: each cluster keeps its own colour
        k = max(int(per[row].max()) + 1 for per in maps.values() for row in per)
        k = max(k, int(art.pseudolabel_attrs.get("num_concepts", k)))
        matching = {row: np.arange(k) for per in maps.values() for row in per}
        pools = art.pseudolabel_attrs.get("concept_pools") or [""] * k
        names = [f"concept {c}" + (f" ({pools[c]})" if c < len(pools) and pools[c] else "") for c in range(k)]
        how = "concept colours (no labels to match clusters to classes)"
    colours = palette(len(names))
    titles = {"pseudo_labels": "pseudo label", "model": "model prediction"}
    paths = []
    for index in indices:
        image, label = shown[index], labels[index]
        panels = [("image", image, None)]
        if manifest.num_classes:
            panels.append(("ground truth", None if label is None else blend(image, colourise(label, colours)), label))
        for row, clusters in maps[index].items():
            lut = matching[row]
            lut = np.concatenate([lut, np.full(max(0, int(clusters.max()) + 1 - len(lut)), -1)])
            classes = lut[clusters]
            rgb = colourise(classes, colours)
            rgb[classes < 0] = UNMATCHED_COLOUR
            panels.append((titles[row], blend(image, rgb), classes))
        fig = Figure(figsize=(2.9 * len(panels), 3.6))
        axes = fig.subplots(1, len(panels))
        for ax, (title, picture, _) in zip(axes, panels):
            if picture is None:
                ax.text(0.5, 0.5, "no label", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(picture)
            _axis(ax, title)
        axes[0].set_title(f"{art.image_ids[index]} (#{index})", fontsize=9)
        present = sorted({int(c) for _, _, ids in panels[1:] if ids is not None for c in np.unique(ids)})
        handles = [Patch(color=colours[c] / 255.0, label=names[c]) for c in present if 0 <= c < len(names)]
        if any(c < 0 for c in present):
            handles.append(Patch(color=np.array(UNMATCHED_COLOUR) / 255.0, label="unmatched cluster"))
        if manifest.ignore_index in present:
            handles.append(Patch(color=np.array(IGNORE_COLOUR) / 255.0, label="ignore"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7) or 1, fontsize=8, frameon=False)
        fig.suptitle(how, fontsize=8, y=0.99)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        paths.append(save_figure(fig, Path(out_dir) / f"{file_stem(index, art.image_ids[index])}.png"))
    return paths


# ----------------------------------------------------------------------------- CLI
def _common(fn: Callable) -> Callable:
    """--cache / --out, and the image choice: --id, --index, --random N --seed S --split."""
    options = [
        click.option("--cache", "cache_dir", default="cache", show_default=True,
                     type=click.Path(file_okay=False), help="Cache folder the stages wrote."),
        click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
                     help="Folder for the PNGs [default: <cache>/inspect/<what>]."),
        click.option("--id", "ids", multiple=True, metavar="ID", help="Image id (repeatable)."),
        click.option("--index", "indices", multiple=True, type=int, metavar="N",
                     help="Manifest index (repeatable)."),
        click.option("--random", "n_random", default=0, type=click.IntRange(min=0), metavar="N",
                     help="Also N images drawn at random."),
        click.option("--seed", default=0, show_default=True, help="Seed of --random."),
        click.option("--split", default=None, help="Split --random draws from [default: all images]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _choose(art: Artifacts, ids, indices, n_random: int, seed: int, split: str | None, default: int) -> list[int]:
    """The chosen images; `default` seeded random ones when none were named."""
    if not (ids or indices or n_random):
        n_random = default
    return art.select(ids, indices, n_random, seed, split)


def _run(cache_dir: str, out_dir: str | None, what: str, make: Callable[[Artifacts, Path], list[Path]]) -> None:
    try:
        with open_artifacts(cache_dir) as art:
            paths = make(art, Path(out_dir) if out_dir else Path(cache_dir) / "inspect" / what)
    except (InputError, ProvenanceError) as exc:
        raise click.ClickException(str(exc)) from exc
    for path in paths:
        click.echo(str(path))


@click.group("inspect", context_settings={"help_option_names": ["-h", "--help"]})
def inspect_group() -> None:
    """Pictures of what a stage produced, as PNGs (their paths are printed).

    Images are chosen with --id / --index (repeatable) or --random N --seed S
    [--split NAME]; without a choice a few seeded random images are taken.
    """


@inspect_group.command("features")
@_common
def features_command(cache_dir, out_dir, ids, indices, n_random, seed, split) -> None:
    """Image | patch features by PCA (fitted over the chosen images) | saliency."""
    _run(cache_dir, out_dir, "features",
         lambda art, out: plot_features(art, _choose(art, ids, indices, n_random, seed, split, 4), out))


@inspect_group.command("concepts")
@click.option("--cache", "cache_dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the PNGs [default: <cache>/inspect/concepts].")
@click.option("--per-concept", default=16, show_default=True, type=click.IntRange(min=1),
              help="Crops shown per concept, nearest the centroid first.")
@click.option("--concept", "chosen", multiple=True, type=int, help="Only these concepts (repeatable).")
@click.option("--max-points", default=20000, show_default=True, help="Crops in the 2-D projection.")
def concepts_command(cache_dir, out_dir, per_concept, chosen, max_points) -> None:
    """Per concept, its crops nearest the centroid and its size; a 2-D projection of all crops."""
    _run(cache_dir, out_dir, "concepts",
         lambda art, out: plot_concepts(art, out, per_concept=per_concept, max_points=max_points,
                                        concepts=list(chosen) or None))


@inspect_group.command("pseudolabels")
@_common
def pseudolabels_command(cache_dir, out_dir, ids, indices, n_random, seed, split) -> None:
    """Image | hard pseudo-label overlay | each concept's CAM as a heat map."""
    def make(art: Artifacts, out: Path) -> list[Path]:
        chosen = _choose(art, ids, indices, n_random, seed, split, 1)
        return [plot_pseudolabels(art, i, out) for i in progress(chosen, desc="inspect pseudolabels")]
    _run(cache_dir, out_dir, "pseudolabels", make)


@inspect_group.command("predictions")
@_common
@click.option("--no-model", is_flag=True, help="Leave out the model column (no inference).")
def predictions_command(cache_dir, out_dir, ids, indices, n_random, seed, split, no_model) -> None:
    """Image | ground truth | pseudo label | model prediction, Hungarian-matched class colours."""
    def make(art: Artifacts, out: Path) -> list[Path]:
        # Random draws default to the evaluated split: the matching was fitted there.
        pool = split if split is not None else _evaluated_split(art)
        chosen = _choose(art, ids, indices, n_random, seed, pool, 4)
        return plot_predictions(art, chosen, out, with_model=False if no_model else None)
    _run(cache_dir, out_dir, "predictions", make)


def _evaluated_split(art: Artifacts) -> str | None:
    try:
        return art.metrics.get("evaluation", {}).get("split")
    except InputError:
        return None
