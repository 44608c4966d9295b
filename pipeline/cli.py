"""`transfgu`: one subcommand per pipeline stage (pipeline.stages.STAGES), plus listings.

A stage subcommand is also that stage's command in dvc.yaml, so `transfgu features
--set backbone.batch_size=4` runs exactly what `dvc repro -s features` would with that
parameter changed (without DVC's bookkeeping).
"""
from __future__ import annotations

import os
import sys

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. On a
# shared or oversubscribed machine spinning threads take the cores from the ones with work (a
# demo training epoch under two CPU burners: 23 s spinning, 16 s passive; idle: 10.9 s and 9.5 s;
# the same numbers either way). An OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from pipeline.config import load_config
from pipeline.errors import InputError, ProvenanceError
from pipeline.stages import STAGES, interrupted_message, run_stage

params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="Parameters file.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a parameter, e.g. --set train.epochs=2 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """TransFGU: top-down unsupervised semantic segmentation as a staged, cached pipeline.

    Stages, in order: synthesize (demo data), prepare, features, concepts,
    pseudolabels, train, evaluate, report. `dvc repro` runs them all with
    caching; `transfgu settings` lists the named configurations.
    """


def _stage_command(name: str, help: str) -> click.Command:
    @params_option
    @set_option
    def command(params_path: str, overrides: tuple[str, ...]) -> None:
        config = None
        try:
            config = load_config(params_path, overrides)
            run_stage(name, config)
        except (InputError, ProvenanceError) as exc:
            raise click.ClickException(f"stage '{name}': {exc}") from exc
        except KeyboardInterrupt:
            click.echo(f"\n{interrupted_message(name, config)}", err=True)
            sys.exit(130)       # as a shell reports Ctrl-C (click.Abort would add "Aborted!")
    return click.command(name=name, help=help)(command)


for _name, _stage in STAGES.items():
    main.add_command(_stage_command(_name, _stage.help))

from pipeline.inspection import inspect_group  # noqa: E402  (after the stage commands: help order)

main.add_command(inspect_group)


@main.command("backbones")
def backbones_command() -> None:
    """List the registered backbones."""
    from pipeline.backbones import BACKBONES

    for name in BACKBONES:
        click.echo(name)


@main.command("datasets")
def datasets_command() -> None:
    """List the dataset readers `data.dataset` can name."""
    from pipeline.data import DATASETS

    for name in DATASETS:
        click.echo(name)


@main.command("metrics")
@click.option("--cache", "cache_dir", default="cache", show_default=True, type=click.Path(file_okay=False))
def metrics_command(cache_dir: str) -> None:
    """The evaluation rows of cache/metrics.json as a short table (dvc metrics show has them all)."""
    import json

    from pipeline.layout import artifact_path

    path = artifact_path(cache_dir, "metrics")
    if not path.exists():
        raise click.ClickException(f"{path}: not found; run the evaluate stage first (dvc repro)")
    metrics = json.loads(path.read_text())
    info = metrics.get("evaluation", {})
    if info.get("skipped"):
        shares = metrics.get("model", {}).get("cluster_share", [])
        click.echo(f"no scores: {info['skipped']}")
        click.echo("model clusters, share of pixels: " + ", ".join(f"{c}: {100 * v:.1f}%" for c, v in enumerate(shares)))
        return
    click.echo(f"{info.get('dataset', '?')} / {info.get('split', '?')} ({info.get('images', '?')} images), "
               f"protocol {info.get('protocol', '?')}{' + CRF' if info.get('crf') else ''}")
    click.echo(f"{'row':15s} {'mIoU':>7s} {'pixel acc.':>11s} {'clusters':>9s}")
    for row in ("model", "pseudo_labels", "bottom_up"):
        if row in metrics:
            m = metrics[row]
            click.echo(f"{row:15s} {m['miou']:7.2f} {m['pixel_accuracy']:11.2f} {m.get('num_clusters', '?'):>9}")


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="DIR_OR_IMAGES...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <name>.png (cluster ids), <name>_overlay.jpg and clusters.json.")
@click.option("--cache", "cache_dir", default="cache", show_default=True, type=click.Path(file_okay=False),
              help="The run whose trained model predicts.")
@click.option("--weights", default=None, help="Backbone weights file (default: the run's backbone.weights).")
@click.option("--recursive", is_flag=True, help="Also the images in subfolders of a folder.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def predict_command(inputs: tuple[str, ...], out_dir: str, cache_dir: str, weights: str | None, recursive: bool,
                    device: str) -> None:
    """Segment any images with the trained model: label PNGs and colour overlays."""
    from pathlib import Path

    from pipeline.artifacts import open_artifacts
    from pipeline.predict import collect_images, predict_images
    from pipeline.runtime import resolve_device

    out = Path(out_dir).resolve()
    for folder in (Path(i).resolve() for i in inputs if Path(i).is_dir()):
        if folder in out.parents:        # --out the folder itself is refused below
            click.echo(f"note: --out {out_dir} is inside the image folder {folder}: the PNGs and overlays written "
                       f"there count as images of that folder from now on (a dataset's folder: its prepare "
                       f"stage reruns); a folder beside it avoids that", err=True)
    try:
        images = collect_images(inputs, recursive=recursive)
        with open_artifacts(cache_dir, weights=weights, device=str(resolve_device(device))) as art:
            predict_images(art, images, out_dir)
    except (InputError, ProvenanceError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("protocols")
def protocols_command() -> None:
    """List the evaluation protocols `evaluate.protocol` can name."""
    from pipeline.evaluate import PROTOCOLS

    for name, protocol in PROTOCOLS.items():
        click.echo(f"{name:10s} {protocol.description}")


@main.group("settings", invoke_without_command=True)
@click.pass_context
def settings_group(ctx: click.Context) -> None:
    """List the named settings (one per paper row, plus camvid and demo)."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.settings import SETTINGS

    click.echo(f"{'setting':20s} {'dataset':13s} {'classes':>7s} {'K':>9s} {'size':>8s} {'epochs':>6s} "
               f"{'lr':>7s} {'backbone':27s} paper mIoU / acc")
    for setting in (SETTINGS.get(n) for n in SETTINGS):
        p = setting.params()
        k = "+".join(str(v) for v in p["concepts"]["k"].values()) + ("+bg" if p["pseudolabels"]["background"] else "")
        size = "x".join(str(v) for v in p["features"]["image_size"])
        click.echo(f"{setting.name:20s} {p['data']['dataset']:13s} {_num_classes(p['data']['dataset']):>7s} "
                   f"{k:>9s} {size:>8s} {p['train']['epochs']:>6d} {p['train']['lr']:>7.0e} "
                   f"{p['backbone']['name']:27s} {setting.paper or '-'}")


def _num_classes(dataset: str) -> str:
    from pipeline.data import get_reader

    names = get_reader(dataset).class_names
    return str(len(names)) if names else "?"  # the folder reader learns its classes from the data


@settings_group.command("use")
@click.argument("name")
@click.option("--data-root", default=None, help="Dataset folder (data.root); default: the setting's.")
@params_option
def settings_use(name: str, data_root: str | None, params_path: str) -> None:
    """Write setting NAME to params.yaml (then `dvc repro` or `dvc exp run`)."""
    from pipeline.settings import SETTINGS, write_params

    try:
        SETTINGS.get(name)
    except InputError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {write_params(name, params_path, data_root)} for setting '{name}'")


@main.command("plan")
@click.option("--setting", default=None, help="A named setting (transfgu settings); default: params.yaml.")
@click.option("--images", type=int, default=None, help="Images in all; default: the cache's manifest.")
@click.option("--eval-images", type=int, default=None,
              help="Of which in the evaluation split; default: the published split of the setting.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {artifacts: [{name, bytes, files}], stages, ...}.")
@params_option
@set_option
def plan_command(setting: str | None, images: int | None, eval_images: int | None, as_json: bool,
                 params_path: str, overrides: tuple[str, ...]) -> None:
    """Each artifact's bytes and files and each stage's peak memory, before running (pipeline/plan.py)."""
    import json

    from pipeline.config import apply_overrides, config_from_params
    from pipeline.data import Manifest
    from pipeline.plan import EVAL_IMAGES, format_plan, plan
    from pipeline.settings import SETTINGS

    try:
        if setting:
            config = config_from_params(apply_overrides(SETTINGS.get(setting).params(), list(overrides)),
                                        f"setting {setting}")
        else:
            config = load_config(params_path, overrides)
        manifest, source = None, ""
        existing = config.path("manifest") if config.path("manifest").exists() else None
        if images is None:
            if existing is None:
                raise InputError(config.path("manifest"), "no manifest to plan from: pass --images N "
                                                          "(and --eval-images M), or run the prepare stage")
            manifest = Manifest.load(existing)
        else:
            if images < 1:
                raise InputError(None, f"--images must be at least 1, got {images}")
            if eval_images is None:
                # the published split of the setting, else the evaluation share of this project's manifest
                if config.setting in EVAL_IMAGES:
                    eval_images, source = EVAL_IMAGES[config.setting], "the published split"
                elif existing is not None and not setting:
                    records = Manifest.load(existing).records
                    share = sum(r.split == config.data.eval_split for r in records) / max(len(records), 1)
                    eval_images, source = round(images * share), "this project's share"
                else:
                    eval_images, source = 0, "none known"
            if not 0 <= eval_images <= images:
                raise InputError(None, f"--eval-images must be between 0 and --images ({images}), got {eval_images}")
        result = plan(config, n_images=images, n_eval=eval_images, manifest=manifest)
        if images is not None and source:
            result["eval_images_source"] = f"{source}; --eval-images to change"
    except (InputError, ProvenanceError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=1) if as_json else format_plan(result))


@main.command("dvc-yaml")
@click.option("--check", is_flag=True, help="Exit 1 when dvc.yaml differs from the stage table; write nothing.")
@click.option("--out", default="dvc.yaml", show_default=True, type=click.Path(dir_okay=False))
def dvc_yaml_command(check: bool, out: str) -> None:
    """Write dvc.yaml from the stage table (pipeline/stages.py): commands, params, computed code deps."""
    from pathlib import Path

    from pipeline.files import atomic_write
    from pipeline.stages import dvc_yaml

    text, path = dvc_yaml(), Path(out)
    if check:
        if not path.exists() or path.read_text() != text:
            raise click.ClickException(f"{path}: differs from the stage table; run `transfgu dvc-yaml`")
        click.echo(f"{path} is up to date")
        return
    atomic_write(path, text)
    click.echo(f"wrote {path} ({len(STAGES)} stages)")


def run() -> None:  # pragma: no cover - console entry for python -m
    main(prog_name="transfgu")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
