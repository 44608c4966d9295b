"""One static HTML page over a cache folder: `transfgu report` / `make report` -> cache/report/index.html.

The page sits in a self-contained folder with its PNGs beside it (relative links,
no network, no script), so it can be opened from disk, zipped or served as is:
metrics table, per-class IoU bars, confusion matrices, training curves, concept
galleries and sample overlays. A section whose artifact is missing (its stage has
not run) says so instead of failing the page. The folder is built under
`<out>.partial` and swapped in whole (pipeline.files.commit).
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from matplotlib.figure import Figure

from pipeline.artifacts import Artifacts, open_artifacts
from pipeline.errors import InputError, ProvenanceError
from pipeline.inspection import (palette, plot_concept_gallery, plot_concept_projection, plot_features,
                              plot_predictions, plot_pseudolabels, save_figure)
from pipeline.config import Config
from pipeline.files import atomic_write, commit, partial_path, remove
from pipeline.layout import artifact_path
from pipeline.runtime import log, progress
from pipeline.train.curves import plot_training_curves

ROWS = ("model", "pseudo_labels", "bottom_up")
T = TypeVar("T")


@dataclass
class ReportOptions:
    samples: int = 4                 # evaluation images shown as overlays
    seed: int = 0                    # which ones
    per_concept: int = 12            # crops per concept gallery
    max_points: int = 20000          # crops in the 2-D projection
    eval_split: str | None = None    # default: the split metrics.json says was evaluated
    with_model: bool = True          # run the model for the prediction column


@dataclass
class _Page:
    """Sections of HTML and the folder their images go to."""

    folder: Path
    sections: list[str] = field(default_factory=list)

    def img(self, path: Path, alt: str, css: str = "") -> str:
        rel = path.relative_to(self.folder).as_posix()
        return f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}" class="{css}">'

    def add(self, title: str, anchor: str, body: str) -> None:
        self.sections.append(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>')


def _missing(exc: Exception) -> str:
    return f'<p class="missing">Not available: {html.escape(str(exc))}</p>'


# ----------------------------------------------------------------------------- sections
def metrics_table(metrics: dict) -> str:
    """HTML table of every row of metrics.json (mIoU, pixel accuracy, clusters, protocol)."""
    head = "<tr><th>row</th><th>mIoU (%)</th><th>pixel accuracy (%)</th><th>clusters</th><th>protocol</th></tr>"
    body = []
    names = [r for r in ROWS if r in metrics] + [r for r in metrics if r not in ROWS and isinstance(metrics[r], dict)
                                                  and "miou" in metrics[r]]
    for name in names:
        row = metrics[name]
        body.append(f"<tr><td>{html.escape(name)}</td><td>{_num(row.get('miou'))}</td>"
                    f"<td>{_num(row.get('pixel_accuracy'))}</td><td>{html.escape(str(row.get('num_clusters', '')))}"
                    f"</td><td>{html.escape(str(row.get('protocol', '')))}</td></tr>")
    info = metrics.get("evaluation", {})
    caption = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in info.items())
    return f'<table class="metrics">{head}{"".join(body)}</table><p class="note">{caption}</p>'


def _num(value) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"


def plot_class_iou(metrics: dict, path: Path) -> Path:
    """Horizontal grouped bars: per-class IoU of every row (classes without an IoU left empty)."""
    names = [r for r in ROWS if r in metrics and "per_class_iou" in metrics[r]]
    classes = list(metrics[names[0]]["per_class_iou"]) if names else []
    fig = Figure(figsize=(8, 1.2 + 0.32 * len(classes) * max(1, len(names)) ** 0.5))
    ax = fig.subplots()
    height = 0.8 / max(len(names), 1)
    colours = palette(max(len(names), 1)) / 255.0
    y = np.arange(len(classes))
    for j, name in enumerate(names):
        values = [metrics[name]["per_class_iou"].get(c) for c in classes]
        ax.barh(y + (j - (len(names) - 1) / 2) * height, [np.nan if v is None else v for v in values],
                height=height, color=colours[j], label=f"{name} (mIoU {metrics[name]['miou']:.1f})")
    ax.set_yticks(y, classes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("per-class IoU after Hungarian matching", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _summary(art: Artifacts) -> str:
    manifest = art.manifest
    counts = {s: sum(r.split == s for r in manifest.records) for s in manifest.splits}
    classes = f"{manifest.num_classes} classes" if manifest.num_classes else "no labels"
    items = [f"dataset <b>{html.escape(manifest.dataset)}</b>, {classes}, "
             + ", ".join(f"{n} {html.escape(s)}" for s, n in counts.items()) + " images"]
    if art.has("features"):
        attrs = art.feature_attrs
        items.append(f"backbone <b>{html.escape(str(attrs.get('backbone')))}</b> "
                     f"({html.escape(str(attrs.get('weights_id')))}), training size {attrs.get('image_size')}, "
                     f"patch grid {attrs.get('grid')}")
    if art.has("concepts"):
        concepts = art.concepts
        pools = {p: concepts.pools.count(p) for p in dict.fromkeys(concepts.pools)}
        items.append(f"{concepts.k} concepts ({', '.join(f'{n} {p}' for p, n in pools.items())})")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _read_or_note(page: _Page, title: str, anchor: str, read: Callable[[], T]) -> T | None:
    """What ``read()`` returns, or None after the page's section says why it is missing."""
    try:
        return read()
    except InputError as exc:
        page.add(title, anchor, _missing(exc))
        return None


def _metrics_section(art: Artifacts, page: _Page) -> None:
    metrics = _read_or_note(page, "Metrics", "metrics", lambda: art.metrics)
    if metrics is None:
        return
    skipped = metrics.get("evaluation", {}).get("skipped")
    if skipped:
        shares = metrics.get("model", {}).get("cluster_share", [])
        page.add("Metrics", "metrics", f'<p class="missing">No scores: {html.escape(skipped)}.</p>'
                 "<p>Share of the pixels each model cluster wins: "
                 + ", ".join(f"{c}: {100 * v:.1f}%" for c, v in enumerate(shares)) + "</p>")
        return
    bars = plot_class_iou(metrics, page.folder / "per_class_iou.png")
    page.add("Metrics", "metrics", metrics_table(metrics))
    page.add("Per-class IoU", "per-class-iou", page.img(bars, "per-class IoU bars", "wide"))


def _confusion_section(art: Artifacts, page: _Page) -> None:
    found = [art.path("plots") / f"confusion_{row}.png" for row in ROWS]
    found = [p for p in found if p.exists()]
    if not found:
        if not (art.has("metrics") and art.metrics.get("evaluation", {}).get("skipped")):
            page.add("Confusion matrices", "confusion",
                     _missing(InputError(art.path("plots"), "no confusion_*.png; run the evaluate stage")))
        return
    figures = []
    for src in found:
        dst = page.folder / src.name
        atomic_write(dst, src.read_bytes())
        row = src.stem.removeprefix("confusion_")
        figures.append(f"<figure>{page.img(dst, f'confusion matrix {row}')}<figcaption>{html.escape(row)}"
                       f"</figcaption></figure>")
    page.add("Confusion matrices (row-normalised, %)", "confusion", f'<div class="row">{"".join(figures)}</div>')


def _training_section(art: Artifacts, page: _Page) -> None:
    columns = _read_or_note(page, "Training curves", "training", lambda: art.train_log)
    if columns is None:
        return
    if not columns or not len(next(iter(columns.values()))):
        page.add("Training curves", "training", _missing(ValueError(f"{art.path('train_log')} has no rows")))
        return
    path = plot_training_curves(columns, page.folder / "training_curves.png")
    page.add("Training curves", "training", page.img(path, "training curves", "wide"))


def _concepts_section(art: Artifacts, page: _Page, options: ReportOptions) -> None:
    if not (art.has("concepts") and art.has("features")):
        page.add("Concepts", "concepts", _missing(InputError(art.path("concepts"), "run the concepts stage")))
        return
    folder = page.folder / "concepts"
    projection = plot_concept_projection(art, folder / "projection.png", max_points=options.max_points)
    art.crop_distances()
    galleries = []
    for c in progress(range(art.concepts.k), desc="report concepts", unit="concept"):
        path = plot_concept_gallery(art, c, folder / f"concept_{c:03d}.png", n=options.per_concept)
        galleries.append(f"<figure>{page.img(path, f'concept {c}', 'gallery')}</figure>")
    page.add("Concepts", "concepts",
             f"<p>Crops nearest each centroid (size = crops assigned).</p>{page.img(projection, 'concept projection')}"
             f'<div class="row">{"".join(galleries)}</div>')


def _samples_section(art: Artifacts, page: _Page, options: ReportOptions) -> None:
    if not art.has("pseudolabels"):
        page.add("Samples", "samples", _missing(InputError(art.path("pseudolabels"), "run the pseudolabels stage")))
        return
    if options.samples < 1:
        return
    split = options.eval_split
    if split is None and art.has("metrics"):
        split = art.metrics.get("evaluation", {}).get("split")
    if split not in art.manifest.splits:
        split = None
    chosen = art.select(random=options.samples, seed=options.seed, split=split)
    folder = page.folder / "samples"
    with_model = options.with_model and art.has("model")
    notes = []
    try:
        predictions = plot_predictions(art, chosen, folder / "predictions", with_model=with_model)
    except (InputError, ProvenanceError) as exc:
        if not with_model:
            raise
        # The page still shows the pseudo labels when the model cannot be rebuilt here
        # (e.g. backbone weights not on this machine).
        notes.append(_missing(exc))
        predictions = plot_predictions(art, chosen, folder / "predictions", with_model=False)
    cams = plot_pseudolabels(art, chosen[0], folder / "pseudolabels")
    features = plot_features(art, chosen, folder / "features") if art.has("features") else []
    where = f"split {html.escape(split)}" if split else "all images"
    body = [f"<p>{len(chosen)} images drawn from {where} (seed {options.seed}).</p>",
            "<h3>Image | ground truth | pseudo label | model prediction</h3>" if art.manifest.num_classes
            else "<h3>Image | pseudo label | model prediction (concept colours: no labels)</h3>", *notes,
            *(f"<figure>{page.img(p, p.stem, 'wide')}</figure>" for p in predictions),
            "<h3>Concept CAMs</h3>", f"<figure>{page.img(cams, cams.stem, 'wide')}</figure>"]
    if features:
        body += ["<h3>Patch features (PCA) and saliency</h3>",
                 *(f"<figure>{page.img(p, p.stem, 'wide')}</figure>" for p in features)]
    page.add("Samples", "samples", "\n".join(body))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table.metrics { border-collapse: collapse; } table.metrics td, table.metrics th { border: 1px solid #ccc;
  padding: 0.3em 0.8em; text-align: right; } table.metrics td:first-child { text-align: left; }
img { max-width: 100%; } img.gallery { max-width: 260px; } .row { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0.5em 0; } figcaption { text-align: center; font-size: 0.9em; }
.missing { color: #a40; font-style: italic; } .note { color: #666; font-size: 0.9em; } nav a { margin-right: 1em; }
"""


def render_page(title: str, summary: str, sections: list[str]) -> str:
    anchors = [(s.split('id="', 1)[1].split('"', 1)[0], s.split("<h2>", 1)[1].split("</h2>", 1)[0]) for s in sections]
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in anchors)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>{summary}<nav>{nav}</nav>\n"
            + "\n".join(sections) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- entry point
def build_report(cache_dir: str | Path = "cache", out_dir: str | Path | None = None,
                 options: ReportOptions | None = None, *, weights: str | None = None) -> Path:
    """Write `out_dir/index.html` (default `<cache>/report/`) with its PNGs beside it; returns its path."""
    options = options or ReportOptions()
    cache_dir = Path(cache_dir)
    out_dir = Path(out_dir) if out_dir else artifact_path(cache_dir, "report")
    partial = partial_path(out_dir)
    remove(partial)
    partial.mkdir(parents=True)
    page = _Page(partial)
    builders: list[Callable[[Artifacts, _Page], None]] = [
        _metrics_section, _confusion_section, _training_section,
        lambda a, p: _concepts_section(a, p, options), lambda a, p: _samples_section(a, p, options)]
    try:
        with open_artifacts(cache_dir, weights=weights) as art:
            summary = _summary(art)
            for build in builders:
                build(art, page)
        atomic_write(partial / "index.html", render_page("TransFGU pipeline report", summary, page.sections))
        commit(partial, out_dir)
    finally:
        remove(partial)   # nothing to resume in a report: a failed one leaves no trace
    index = out_dir / "index.html"
    log(f"report: wrote {index} ({sum(1 for _ in out_dir.rglob('*.png'))} images)")
    return index


def report_stage(config: Config) -> None:
    """Stage `report`: cache/report/index.html over every artifact of the cache."""
    build_report(config.cache_dir, config.path("report"), ReportOptions(eval_split=config.data.eval_split),
                 weights=config.backbone.weights or None)
