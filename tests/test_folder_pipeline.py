"""A folder of one's own images without labels, end to end through the CLI: the `folder`
setting, every stage (no synthetic data made, evaluation rows skipped with the reason, the
report with predictions in concept colours) and `transfgu predict` on new images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data import generate_synthetic
from pipeline.stages import STAGES

K = 4


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    generate_synthetic(tmp / "scenes", n_train=10, n_val=3, size=(64, 64), seed=3)
    photos = tmp / "photos"                     # images only: no labels/, no classes.txt
    photos.mkdir()
    for path in sorted((tmp / "scenes" / "images").glob("train_*.png")):
        Image.open(path).convert("RGB").save(photos / f"{path.stem}.jpg", quality=95)
    params = tmp / "params.yaml"
    _invoke("settings", "use", "folder", "--data-root", str(photos), "--params", str(params))
    config = yaml.safe_load(params.read_text())
    assert config["data"] == {"dataset": "folder", "root": str(photos), "options": {}, "train_split": "train",
                              "eval_split": "train"}
    config["cache"] = str(tmp / "cache")
    config["synthetic"]["out"] = str(tmp / "synthetic")
    config["features"].update({"image_size": [64, 64], "crop_size": 32})
    config["concepts"].update({"k": {"all": K}, "iterations": 10})
    config["train"].update({"epochs": 2, "batch_size": 4, "num_workers": 0, "bootstrap_start": 1,
                            "teacher_interval": 1})
    params.write_text(yaml.safe_dump(config))
    logs = {stage: _invoke(stage, "--params", str(params)) for stage in STAGES.names()}
    return tmp, logs


def test_no_synthetic_data_is_generated_for_a_folder(run):
    tmp, _ = run
    assert [p.name for p in (tmp / "synthetic").iterdir()] == ["NOT_GENERATED.txt"]


def test_evaluation_rows_are_skipped_with_the_reason_and_the_model_still_predicts(run):
    tmp, _ = run
    metrics = json.loads((tmp / "cache" / "metrics.json").read_text())
    assert "no labels in split 'train'" in metrics["evaluation"]["skipped"]
    assert "miou" not in metrics.get("model", {}) and "pseudo_labels" not in metrics
    shares = metrics["model"]["cluster_share"]
    assert len(shares) == K and sum(shares) == pytest.approx(1.0, abs=1e-4)
    out = _invoke("metrics", "--cache", str(tmp / "cache"))
    assert out.startswith("no scores: no labels") and "share of pixels" in out


def test_report_shows_predictions_in_concept_colours(run):
    tmp, _ = run
    report = tmp / "cache" / "report"
    page = (report / "index.html").read_text()
    assert "no labels" in page and "Image | pseudo label | model prediction (concept colours" in page
    assert "Not available" not in page.split('id="samples"')[-1]           # the samples section is complete
    assert len(list((report / "samples" / "predictions").glob("*.png"))) >= 1
    assert len(list((report / "concepts").glob("concept_*.png"))) == K
    assert not (tmp / "cache" / "report.partial").exists()


def test_predict_writes_label_pngs_and_overlays_for_new_images(run, tmp_path):
    tmp, _ = run
    new = tmp_path / "new"
    new.mkdir()
    sizes = {"wide": (40, 90), "tall": (100, 50)}            # any size: labels come back at the image's own
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(new / f"{name}.png")
    _invoke("predict", str(new), "--out", str(tmp_path / "out"), "--cache", str(tmp / "cache"))
    for name, (h, w) in sizes.items():
        ids = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert ids.shape == (h, w) and ids.max() < K
        assert Image.open(tmp_path / "out" / f"{name}_overlay.jpg").size == (w, h)
    clusters = json.loads((tmp_path / "out" / "clusters.json").read_text())["clusters"]
    assert [c["id"] for c in clusters] == list(range(K)) and {c["concept_pool"] for c in clusters} == {"all"}
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "absent"), "--out", str(tmp_path / "o2"),
                                       "--cache", str(tmp / "cache")])
    assert result.exit_code == 1 and f"{tmp_path / 'absent'}: no such file or folder" in result.output


def test_predict_never_overwrites_the_input_images(run, tmp_path):
    tmp, _ = run
    photo = tmp_path / "a.png"
    Image.fromarray(np.full((20, 30, 3), 120, dtype=np.uint8)).save(photo)
    before = photo.read_bytes()
    result = CliRunner().invoke(main, ["predict", str(tmp_path), "--out", str(tmp_path), "--cache", str(tmp / "cache")])
    assert result.exit_code == 1 and f"{photo}: is one of the input images" in result.output
    assert photo.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_predict_into_a_subfolder_of_the_images_says_what_that_does(run, tmp_path):
    tmp, _ = run
    Image.fromarray(np.full((20, 30, 3), 120, dtype=np.uint8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["predict", str(tmp_path), "--out", str(tmp_path / "pred"),
                                       "--cache", str(tmp / "cache")])
    assert result.exit_code == 0, result.output
    assert f"note: --out {tmp_path / 'pred'} is inside the image folder {tmp_path.resolve()}" in result.output
    assert (tmp_path / "pred" / "a.png").exists()
