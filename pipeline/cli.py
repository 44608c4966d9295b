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
    pseudolabels, train, evaluate. `dvc repro` runs them all with caching.
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


@main.command("protocols")
def protocols_command() -> None:
    """List the evaluation protocols `evaluate.protocol` can name."""
    from pipeline.evaluate import get_protocol, list_protocols

    for name in list_protocols():
        click.echo(f"{name:10s} {get_protocol(name).description}")


def run() -> None:  # pragma: no cover - console entry for python -m
    main(prog_name="transfgu")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
