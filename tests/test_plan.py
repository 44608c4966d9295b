"""`transfgu plan` against a real run: the bytes and files each artifact has on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.concepts import concepts_stage
from pipeline.config import load_config
from pipeline.data import build_manifest, generate_synthetic
from pipeline.features import features_stage
from pipeline.plan import plan
from pipeline.pseudolabels import pseudolabels_stage


def _on_disk(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    sizes = [os.path.getsize(Path(folder) / name) for folder, _, names in os.walk(path) for name in names]
    return sum(sizes), len(sizes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small real run (12 train + 4 val images, shards of 4): manifest, features, concepts, pseudo labels."""
    tmp = tmp_path_factory.mktemp("plan")
    generate_synthetic(tmp / "images", n_train=12, n_val=4, size=(64, 64), seed=3)
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({
        "cache": str(tmp / "cache"), "backbone": {"name": "vit_tiny_random", "device": "cpu", "batch_size": 4},
        "data": {"dataset": "synthetic", "root": str(tmp / "images")},
        "features": {"image_size": [64, 64], "concept_scale": 1.0, "crop_fractions": [0.5, 0.25], "crop_size": 32,
                     "pools": ["thing", "stuff"], "chunk_images": 4, "bottom_up_samples": 48},
        "concepts": {"k": {"thing": 2, "stuff": 2}, "iterations": 3},
        "pseudolabels": {"batch_size": 4, "cam_dtype": "uint16"}}))
    config = load_config(params)
    build_manifest("synthetic", tmp / "images").save(config.path("manifest"))
    for stage in (features_stage, concepts_stage, pseudolabels_stage):
        stage(config)
    return params, config


def test_plan_matches_the_bytes_and_files_written(run):
    params, config = run
    from pipeline.data import Manifest

    result = plan(config, manifest=Manifest.load(config.path("manifest")))
    by_name = {a["name"]: a for a in result["artifacts"]}
    for name in ("manifest", "features", "pseudolabels"):
        size, files = _on_disk(config.path(name))
        assert by_name[name]["files"] == files, name
        assert abs(by_name[name]["bytes"] - size) <= 0.1 * size, (name, by_name[name]["bytes"], size)


def test_plan_cli_prints_json_for_a_setting_and_an_image_count():
    out = CliRunner().invoke(main, ["plan", "--setting", "demo", "--images", "1000", "--eval-images", "100", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["images"] == 1000 and result["eval_images"] == 100
    names = [a["name"] for a in result["artifacts"]]
    assert {"features", "pseudolabels"} <= set(names)
    assert all(set(a) >= {"name", "bytes", "files"} and a["bytes"] > 0 for a in result["artifacts"])


def test_plan_without_images_or_manifest_says_what_to_pass(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"cache": str(tmp_path / "cache")}))
    out = CliRunner().invoke(main, ["plan", "--params", str(params)])
    assert out.exit_code != 0 and "pass --images N" in out.output
