"""The pipeline, declared once: every stage with the params it reads, the artifacts it reads
and writes, and the function that runs it.

From this one table come `dvc.yaml` (`transfgu dvc-yaml` writes it; a test fails when the
committed file differs), the CLI's stage subcommands (`transfgu <stage>`, which is also
each stage's DVC command) and, through :mod:`pipeline.layout`, the paths
:mod:`pipeline.artifacts` opens.

Code dependencies are computed, not listed: a stage depends on exactly the project
files its function's module imports, transitively (:func:`code_dependencies`), so that
editing `pipeline/report.py` reruns only `report`, and editing label decoding reruns
`prepare` and every stage that reads labels. This module imports nothing heavy; a
stage's module is imported only when the stage runs.
"""
from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from pipeline.layout import ARTIFACTS, CACHE_DIR
from pipeline.registry import Registry

if TYPE_CHECKING:
    from pipeline.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name in dvc.yaml and on the command line.
        help: one line, shown by `transfgu --help`.
        run: ``"module:function"``; the function takes the :class:`~pipeline.config.Config`.
        params: params.yaml sections or dotted keys the stage reads.
        inputs: artifact names (pipeline.layout.ARTIFACTS) it reads.
        outputs: artifact names it writes.
        data_inputs, data_outputs: paths outside the cache, as params templates (``${data.root}``).
        keeps: what an interrupted run keeps for the next to resume from, with ``{artifact}``
            standing for an artifact's path (``interrupted_message``); "" when it keeps nothing.
    """

    name: str
    help: str
    run: str
    params: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    data_inputs: tuple[str, ...] = ()
    data_outputs: tuple[str, ...] = ()
    keeps: str = ""

    @property
    def module(self) -> str:
        return self.run.split(":")[0]

    def function(self) -> Callable[["Config"], None]:
        """The function that runs the stage (its module is imported now)."""
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: Registry[Stage] = Registry("stage")


def _declare(stage: Stage) -> None:
    STAGES.register(stage.name, stage)


_declare(Stage(
    "synthesize", "Generate the deterministic synthetic demo dataset (images, labels, splits).",
    "pipeline.data.synthetic:synthesize_stage", params=("synthetic", "data.dataset"), data_outputs=("${synthetic.out}",)))
_declare(Stage(
    "prepare", "Check the dataset's layout and write the manifest (one row per image).",
    "pipeline.data.readers:prepare_stage", params=("data",), outputs=("manifest",),
    data_inputs=("${data.root}",)))
_declare(Stage(
    "features", "Embed every image (patch features, embedding, saliency) and the concept crops into Zarr.",
    "pipeline.features:features_stage", params=("backbone", "features", "data.train_split", "data.eval_split"),
    inputs=("manifest",), outputs=("features",), keeps="the shards it finished, in {features}.partial"))
_declare(Stage(
    "concepts", "Cluster the crop embeddings into concepts with FAISS k-means.",
    "pipeline.concepts:concepts_stage", params=("concepts", "backbone.name", "features", "data.train_split"),
    inputs=("features",), outputs=("concepts",)))
_declare(Stage(
    "pseudolabels", "Compute one CAM per image per concept and write them to HDF5.",
    "pipeline.pseudolabels:pseudolabels_stage", params=("backbone", "features.image_size", "pseudolabels"),
    inputs=("manifest", "concepts"), outputs=("pseudolabels",),
    keeps="the images it finished, in {pseudolabels}.partial"))
_declare(Stage(
    "train", "Train the mask-transformer decoder on the frozen backbone from the pseudo labels.",
    "pipeline.train.stage:train_stage",
    params=("backbone", "features.image_size", "data.train_split", "pseudolabels.background",
            "pseudolabels.background_threshold", "train"),
    inputs=("manifest", "concepts", "pseudolabels"), outputs=("model", "train_log", "train_curves", "checkpoint"),
    keeps="the epochs it finished, in {checkpoint}"))
_declare(Stage(
    "evaluate", "Score the model, the pseudo labels and the bottom-up baseline on the evaluation split.",
    "pipeline.evaluate:evaluate_stage",
    params=("backbone", "features", "data.train_split", "data.eval_split", "pseudolabels.background", "evaluate"),
    inputs=("manifest", "features", "concepts", "pseudolabels", "model"), outputs=("plots", "metrics")))
_declare(Stage(
    "report", "Write the static HTML report cache/report/index.html (metrics, IoU bars, confusion, "
              "training curves, concept galleries, sample overlays).",
    "pipeline.report:report_stage", params=("data.eval_split", "backbone.weights"),
    inputs=("manifest", "features", "concepts", "pseudolabels", "model", "train_log", "metrics", "plots"),
    outputs=("report",)))

# `dvc plots show` shows these (dvc_plots/index.html). PNGs only: dvc draws data plots with
# Vega loaded from a CDN, which never renders offline.
PLOTS = [
    f"{CACHE_DIR}/{ARTIFACTS['train_curves'].path}",
    *[f"{CACHE_DIR}/{ARTIFACTS['plots'].path}/confusion_{row}.png" for row in ("model", "pseudo_labels", "bottom_up")],
]


def interrupted_message(name: str, config: "Config | None") -> str:
    """What the CLI says when stage ``name`` is interrupted (Ctrl-C): what is kept, and how to go on
    (``config`` None: interrupted while reading its parameters)."""
    stage = STAGES.get(name)
    if config is None:
        return f"stage '{name}' interrupted before it started"
    if not stage.keeps:
        return f"stage '{name}' interrupted; it keeps nothing to resume from: run it again"
    kept = stage.keeps.format(**{artifact: config.path(artifact) for artifact in ARTIFACTS})
    return f"stage '{name}' interrupted; kept for the next run to resume from: {kept}"


def run_stage(name: str, config: "Config") -> None:
    """Run stage ``name`` with ``config`` (what `transfgu <name>` and `dvc repro` do)."""
    STAGES.get(name).function()(config)


# ----------------------------------------------------------------------------- code dependencies
def _module_file(module: str) -> Path | None:
    """The source file of a project module (package -> its __init__.py), None outside the project."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(module: str) -> set[str]:
    """Project modules that project module ``module`` imports anywhere in its body,
    function-level imports included, ``if TYPE_CHECKING:`` blocks excluded."""
    path = _module_file(module)
    if path is None:
        raise KeyError(f"{module} is not a module of this project")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)   # `from pkg import submodule`
    return {m for m in found if _module_file(m) is not None}


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=None)
def import_closure(module: str) -> tuple[str, ...]:
    """Every project module that importing ``module`` runs, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in _with_parents(current):
            if name in seen or _module_file(name) is None:
                continue
            seen.add(name)
            todo.extend(imported_modules(name))
    return tuple(sorted(seen))


def code_dependencies(stage: Stage) -> list[str]:
    """Project files stage ``stage`` runs, relative to the project root: the import closure of
    its module and of the config loader its command uses, plus the data folders of the
    packages in it (files a package reads at run time, such as pipeline/data/lists)."""
    modules = set(import_closure(stage.module)) | set(import_closure(f"{PACKAGE}.config"))
    files = {_module_file(m) for m in modules}
    for path in list(files):
        if path.name == "__init__.py":
            files.update(d for d in path.parent.iterdir()
                         if d.is_dir() and d.name != "__pycache__" and not any(d.glob("**/*.py")))
    return sorted(p.relative_to(PROJECT_ROOT).as_posix() for p in files if p is not None)


# ----------------------------------------------------------------------------- dvc.yaml
def _out_entry(name: str) -> str | dict:
    artifact = ARTIFACTS[name]
    path = f"{CACHE_DIR}/{artifact.path}"
    return {path: dict(artifact.dvc)} if artifact.dvc else path


def dvc_stage(stage: Stage) -> dict:
    """The dvc.yaml entry of ``stage``."""
    entry: dict = {"cmd": f"transfgu {stage.name}",
                   "deps": [*code_dependencies(stage), *stage.data_inputs,
                            *(f"{CACHE_DIR}/{ARTIFACTS[a].path}" for a in stage.inputs)],
                   "params": list(stage.params)}
    outs = [_out_entry(a) for a in stage.outputs if not ARTIFACTS[a].metric] + list(stage.data_outputs)
    metrics = [_out_entry(a) for a in stage.outputs if ARTIFACTS[a].metric]
    if outs:
        entry["outs"] = outs
    if metrics:
        entry["metrics"] = metrics
    return entry


DVC_HEADER = """\
# Generated by `transfgu dvc-yaml` from pipeline/stages.py: edit the table there, not this file
# (tests/test_stages.py fails when the two differ). Each stage's command is the CLI, its code
# deps are the project files its module imports (transitively), and its paths come from
# pipeline/layout.py.
"""


def dvc_yaml() -> str:
    """The text of dvc.yaml."""
    document = {"stages": {stage.name: dvc_stage(stage) for stage in (STAGES.get(n) for n in STAGES)},
                "plots": PLOTS}
    return DVC_HEADER + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=100)
