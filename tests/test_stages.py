"""The stage table: dvc.yaml is generated from it, and code dependencies follow the import graph."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.layout import ARTIFACTS
from pipeline.stages import PROJECT_ROOT, STAGES, code_dependencies, dvc_yaml, imported_modules

REPO = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_generated_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml drifted: run `transfgu dvc-yaml`"


def test_dvc_yaml_command_writes_and_checks(tmp_path):
    out = tmp_path / "dvc.yaml"
    runner = CliRunner()
    assert runner.invoke(main, ["dvc-yaml", "--check", "--out", str(out)]).exit_code == 1
    assert runner.invoke(main, ["dvc-yaml", "--out", str(out)]).exit_code == 0
    result = runner.invoke(main, ["dvc-yaml", "--check", "--out", str(out)])
    assert result.exit_code == 0 and "up to date" in result.output
    out.write_text(out.read_text() + "# hand edit\n")
    result = runner.invoke(main, ["dvc-yaml", "--check", "--out", str(out)])
    assert result.exit_code == 1 and "differs from the stage table" in result.output


def test_every_stage_is_a_cli_command_and_its_dvc_command():
    stages = yaml.safe_load(dvc_yaml())["stages"]
    assert list(stages) == STAGES.names()
    for name, entry in stages.items():
        assert entry["cmd"] == f"transfgu {name}"
        assert name in main.commands and main.commands[name].help == STAGES.get(name).help
    for name, artifact in ARTIFACTS.items():   # every artifact is written by one stage at most
        writers = [s for s in STAGES.names() if name in STAGES.get(s).outputs]
        assert len(writers) <= 1, (name, writers)


def _deps(stage: str) -> set[str]:
    return set(code_dependencies(STAGES.get(stage)))


def test_report_code_is_a_dependency_of_report_only():
    assert [s for s in STAGES.names() if "pipeline/report.py" in _deps(s)] == ["report"]


def test_label_decoding_is_a_dependency_of_every_stage_that_reads_labels():
    for path in ("pipeline/data/images.py", "pipeline/data/readers.py", "pipeline/data/lists"):
        users = {s for s in STAGES.names() if path in _deps(s)}
        assert {"prepare", "evaluate", "report"} <= users, (path, users)


def test_training_code_is_not_a_dependency_of_evaluation():
    assert "pipeline/train/loop.py" in _deps("train")
    assert "pipeline/train/loop.py" not in _deps("evaluate")        # evaluate loads the model only
    assert "pipeline/train/inference.py" in _deps("evaluate")


@pytest.mark.parametrize("stage", STAGES.names())
def test_computed_dependencies_cover_what_python_actually_imports(stage):
    """Import the stage's module (and the config loader) in a fresh interpreter: every project
    module Python loaded must be among the computed dependencies (which also hold the
    modules imported inside functions, that plain importing does not load)."""
    module = STAGES.get(stage).module
    code = (f"import sys, importlib; importlib.import_module('pipeline.config'); importlib.import_module({module!r}); "
            f"print(__import__('json').dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline')))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    files = set()
    for name in loaded:
        base = PROJECT_ROOT.joinpath(*name.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        files.add(path.relative_to(PROJECT_ROOT).as_posix())
    assert files <= _deps(stage), sorted(files - _deps(stage))


def test_no_import_cycles_in_the_project():
    modules = {".".join(p.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (PROJECT_ROOT / "pipeline").rglob("*.py")}
    edges = {m: imported_modules(m) - {m} for m in modules}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [module, target])}"
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
    assert "pipeline.data.readers" in edges["pipeline.data.images"] or \
        "pipeline.data.images" in edges["pipeline.data.readers"]     # the graph is really read


@pytest.mark.parametrize("name", STAGES.names())
def test_an_interrupted_stage_says_what_it_keeps_and_exits_as_ctrl_c(name, tmp_path, monkeypatch):
    def interrupted(stage, config):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.cli.run_stage", interrupted)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"cache": str(tmp_path / "cache")}))
    result = CliRunner().invoke(main, [name, "--params", str(params)])
    assert result.exit_code == 130
    kept = {"features": f"the shards it finished, in {tmp_path / 'cache' / 'features.zarr'}.partial",
            "pseudolabels": f"the images it finished, in {tmp_path / 'cache' / 'pseudolabels.h5'}.partial",
            "train": f"the epochs it finished, in {tmp_path / 'cache' / 'model' / 'last.pt'}"}
    expected = (f"stage '{name}' interrupted; kept for the next run to resume from: {kept[name]}" if name in kept
                else f"stage '{name}' interrupted; it keeps nothing to resume from: run it again")
    assert result.output.strip().splitlines() == [expected]
