"""`transfgu`: one subcommand per pipeline stage, plus listings.

Each stage subcommand reads the same `params.yaml` section as its DVC stage and
accepts `--set section.key=value` overrides, so `transfgu features --set
backbone.batch_size=4` runs exactly what `dvc repro -s features` would with that
parameter changed (without DVC's bookkeeping).
"""
from __future__ import annotations

import sys

import click

from pipeline.config import load_config
from pipeline.errors import InputError, ProvenanceError
from pipeline.jobs import JOB_HELP, list_jobs, run_job

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


def _stage_command(name: str) -> click.Command:
    @params_option
    @set_option
    def command(params_path: str, overrides: tuple[str, ...]) -> None:
        try:
            run_job(name, load_config(params_path, overrides))
        except (InputError, ProvenanceError) as exc:
            raise click.ClickException(str(exc)) from exc
    command.__doc__ = JOB_HELP[name]
    return click.command(name=name, help=JOB_HELP[name])(command)


for _name in list_jobs():
    main.add_command(_stage_command(_name))

from pipeline.inspection import inspect_group  # noqa: E402  (after the stage commands: help order)

main.add_command(inspect_group)


@main.command("backbones")
def backbones_command() -> None:
    """List the registered backbones."""
    from pipeline.backbones import list_backbones

    for name in list_backbones():
        click.echo(name)


@main.command("datasets")
def datasets_command() -> None:
    """List the dataset readers `data.dataset` can name."""
    from pipeline.data import list_datasets

    for name in list_datasets():
        click.echo(name)


@main.command("metrics")
@click.option("--cache", "cache_dir", default="cache", show_default=True, type=click.Path(file_okay=False))
def metrics_command(cache_dir: str) -> None:
    """The evaluation rows of cache/metrics.json as a short table (dvc metrics show has them all)."""
    import json
    from pathlib import Path

    path = Path(cache_dir) / "metrics.json"
    if not path.exists():
        raise click.ClickException(f"{path}: not found; run the evaluate stage first (dvc repro)")
    metrics = json.loads(path.read_text())
    info = metrics.get("evaluation", {})
    click.echo(f"{info.get('dataset', '?')} / {info.get('split', '?')} ({info.get('images', '?')} images), "
               f"protocol {info.get('protocol', '?')}{' + CRF' if info.get('crf') else ''}")
    click.echo(f"{'row':15s} {'mIoU':>7s} {'pixel acc.':>11s} {'clusters':>9s}")
    for row in ("model", "pseudo_labels", "bottom_up"):
        if row in metrics:
            m = metrics[row]
            click.echo(f"{row:15s} {m['miou']:7.2f} {m['pixel_accuracy']:11.2f} {m.get('num_clusters', '?'):>9}")


@main.command("protocols")
def protocols_command() -> None:
    """List the evaluation protocols `evaluate.protocol` can name."""
    from pipeline.evaluate import get_protocol, list_protocols

    for name in list_protocols():
        click.echo(f"{name:10s} {get_protocol(name).description}")


@main.group("settings", invoke_without_command=True)
@click.pass_context
def settings_group(ctx: click.Context) -> None:
    """List the named settings (one per paper row, plus camvid and demo)."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.settings import list_settings

    click.echo(f"{'setting':13s} {'dataset':13s} {'classes':>7s} {'K':>9s} {'size':>8s} {'epochs':>6s} "
               f"{'lr':>7s} {'backbone':27s} paper mIoU / acc")
    for setting in list_settings():
        p = setting.params()
        k = "+".join(str(v) for v in p["concepts"]["k"].values()) + ("+bg" if p["pseudolabels"]["background"] else "")
        size = "x".join(str(v) for v in p["features"]["image_size"])
        click.echo(f"{setting.name:13s} {p['data']['dataset']:13s} {_num_classes(p['data']['dataset']):>7s} "
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
    from pipeline.settings import get_setting, write_params

    try:
        get_setting(name)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    click.echo(f"wrote {write_params(name, params_path, data_root)} for setting '{name}'")


def run() -> None:  # pragma: no cover - console entry for python -m
    main(prog_name="transfgu")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
