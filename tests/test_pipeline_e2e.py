"""`dvc repro` end to end on a tiny synthetic configuration, in a temporary copy of the repo."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr

from pipeline.settings import SETTINGS, merge_params

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "synthetic": {"n_train": 32, "n_val": 12, "size": [128, 128]},
    "features": {"image_size": [128, 128], "crop_fractions": [0.5], "crop_size": 64, "chunk_images": 16},
    "concepts": {"k": {"thing": 3, "stuff": 3}, "iterations": 20},
    "train": {"epochs": 6, "batch_size": 8, "lr": 0.0005, "bootstrap_start": 3, "teacher_interval": [3]},
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # The copy's own code runs (not the installed checkout's): PYTHONPATH comes before the
    # editable install on sys.path.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """Tracked files of the repo, a fresh git + the committed .dvc/, tiny params."""
    dest = tmp_path_factory.mktemp("repo")
    for name in ["pipeline", "dvc.yaml", "params.yaml", ".dvc", ".gitignore", "pyproject.toml"]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, dest / name)
    params = merge_params(SETTINGS.get("demo").params(), TINY)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dest)
    _run(["dvc", "repro"], dest)
    return dest


def test_every_artifact_is_there_and_well_formed(repo_copy):
    cache = repo_copy / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    n = len(manifest["records"])
    assert n == 44

    features = zarr.open_group(str(cache / "features.zarr"), mode="r")
    assert features["patch"].shape[:3] == (n, 8, 8) and features["patch"].dtype == np.float16
    assert features["embedding"].shape[0] == n and features["saliency"].shape == (n, 8, 8)
    train = np.array([r["split"] == "train" for r in manifest["records"]])
    windows = features.attrs["windows_per_image"]
    kinds = features["crops/kind"][:].reshape(n, windows)
    assert set(np.unique(kinds[train])) <= {0, 1, 2} and (kinds[train] > 0).sum() > 0
    assert (kinds[~train] == 255).all()                       # crops of the crop split only
    patch_held = ~np.isnan(features["patch"][:, 0, 0, 0])
    np.testing.assert_array_equal(patch_held, ~train)          # patch features of the evaluation split only
    assert features.attrs["backbone"] == "efficientnet_lite0"
    assert not list(cache.glob("*.partial"))

    concepts = json.loads((cache / "concepts" / "concepts.json").read_text())
    assert concepts["k"] == 6 and sum(concepts["sizes"]) == int(((kinds > 0) & (kinds < 255)).sum())

    with h5py.File(cache / "pseudolabels.h5", "r") as handle:
        assert handle["cam"].shape == (n, 6, 8, 8) and handle["cam"].dtype == np.float16
        assert handle["cam"].chunks == (1, 6, 8, 8)
        assert handle["label"].shape == (n, 8, 8)
        assert handle["done"][:].all()
        assert np.isfinite(handle["cam"][:].astype(np.float32)).all()

    log = (cache / "model" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("epoch") and len(log) == 1 + TINY["train"]["epochs"]
    assert (cache / "model" / "model.pt").exists()
    assert (cache / "plots" / "confusion_model.png").exists()


def test_dvc_cache_does_not_double_the_disk(repo_copy):
    # .dvc/config: cache.type hardlink,symlink,copy. DVC moves each new output into its cache as
    # a hard link, so the big outputs' bytes are on disk once (with reflink first, dvc 3.67 copies).
    files = [p for p in (repo_copy / "cache" / "features.zarr").rglob("*") if p.is_file()]
    files.append(repo_copy / "cache" / "pseudolabels.h5")
    unshared = [str(p) for p in files if not (p.is_symlink() or p.stat().st_nlink >= 2)]
    assert not unshared, f"copies beside .dvc/cache: {unshared[:3]}"


def test_model_beats_a_random_assignment(repo_copy):
    from pipeline.data import Manifest, load_label
    from pipeline.metrics import SegmentationMetrics

    metrics = json.loads((repo_copy / "cache" / "metrics.json").read_text())
    for row in ("model", "pseudo_labels", "bottom_up"):
        assert set(metrics[row]) >= {"miou", "pixel_accuracy", "per_class_iou", "protocol"}
    manifest = Manifest.load(repo_copy / "cache" / "manifest.json", project_dir=repo_copy)
    rng = np.random.default_rng(0)
    random = SegmentationMetrics(len(manifest.class_names), 6)
    for record in manifest.split("val"):
        label = load_label(manifest.resolve(record.label), manifest.dataset, len(manifest.class_names))
        random.update(rng.integers(0, 6, size=label.shape), label)
    chance = random.compute()["miou"]
    assert metrics["model"]["miou"] > 2 * chance, (metrics["model"]["miou"], chance)


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_nothing_changed_after_repro_and_train_param_reruns_only_train_and_downstream(repo_copy):
    status = _run(["dvc", "status"], repo_copy).stdout
    assert "up to date" in status, status
    assert _stages_run(_run(["dvc", "repro"], repo_copy).stdout) == set()

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["epochs"] += 1
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run(["dvc", "status"], repo_copy).stdout
    assert "train:" in changed and "features:" not in changed, changed
    out = _run(["dvc", "repro"], repo_copy).stdout
    # evaluate and the report read the model; nothing upstream of training reruns
    assert _stages_run(out) == {"train", "evaluate", "report"}, out
    log = (repo_copy / "cache" / "model" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + params["train"]["epochs"]


def test_single_stage_rerun(repo_copy):
    out = _run(["dvc", "repro", "-f", "-s", "concepts"], repo_copy).stdout
    assert _stages_run(out) == {"concepts"}, out
    metrics = _run(["dvc", "metrics", "show"], repo_copy).stdout
    assert "model.miou" in metrics


def _changed_stages(repo: Path) -> set[str]:
    """Stage names `dvc status` lists (lines `name:` at column 0)."""
    out = _run(["dvc", "status"], repo).stdout
    return {line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith((" ", "\t"))}


@pytest.mark.parametrize("path, expected", [
    ("pipeline/report.py", {"report"}),
    ("pipeline/data/images.py", {"prepare", "evaluate", "report"}),
])
def test_editing_code_marks_exactly_the_stages_that_import_it(repo_copy, path, expected):
    assert _changed_stages(repo_copy) == set()
    source = repo_copy / path
    original = source.read_text()
    source.write_text(original + "# an edit\n")
    try:
        changed = _changed_stages(repo_copy)
    finally:
        source.write_text(original)
    if path == "pipeline/report.py":
        assert changed == expected, changed
    else:
        assert expected <= changed, changed
    assert _changed_stages(repo_copy) == set()


def test_readme_parameter_changes_after_a_run(repo_copy):
    """The README's examples right after a run: fewer epochs than the checkpoint has done
    cannot resume, so training starts over (one line says why) and gives the clean result."""
    out = _run(["transfgu", "train", "--set", "train.epochs=2"], repo_copy)
    assert "not resuming" in out.stdout + out.stderr and "starting over" in out.stdout + out.stderr
    log = (repo_copy / "cache" / "model" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + 2

    out = _run(["dvc", "exp", "run", "-S", "train.epochs=3"], repo_copy).stdout
    assert _stages_run(out) == {"train", "evaluate", "report"}, out
    log = (repo_copy / "cache" / "model" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + 3
    # `dvc exp show` compares the runs: the experiment has its parameter and its metrics
    rows = list(csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], repo_copy).stdout)))
    experiment = [r for r in rows if r["typ"].startswith("branch")][-1]
    assert experiment["train.epochs"] == "3" and 0 < float(experiment["model.miou"]) <= 100, experiment
