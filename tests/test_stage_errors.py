"""Stages stopped by bad input: a clear error naming the file, earlier outputs left intact."""
from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.settings import SETTINGS


def _params(tmp_path: Path, **sections) -> Path:
    params = SETTINGS.get("demo").params()
    params["cache"] = str(tmp_path / "cache")
    params["synthetic"].update({"out": str(tmp_path / "data"), "n_train": 4, "n_val": 2, "size": [64, 64]})
    params["data"]["root"] = str(tmp_path / "data")
    params["backbone"]["name"] = "vit_tiny_random"
    params["features"].update({"image_size": [64, 64], "crop_fractions": [0.5], "crop_size": 32})
    for section, values in sections.items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_missing_weights_file_stops_features_and_keeps_the_old_store(tmp_path):
    params = _params(tmp_path)
    for stage in ("synthesize", "prepare", "features"):
        assert _invoke(stage, "--params", str(params)).exit_code == 0
    store = tmp_path / "cache" / "features.zarr"
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    result = _invoke("features", "--params", str(params), "--set", "backbone.weights=/nowhere/dino.pth")
    assert result.exit_code != 0
    assert "/nowhere/dino.pth" in result.output
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_truncated_image_is_named_and_finished_shards_are_kept(tmp_path):
    params = _params(tmp_path, features={"chunk_images": 2})
    assert _invoke("synthesize", "--params", str(params)).exit_code == 0
    # prepare reads headers only (fast on 100k images); the truncation shows when decoding
    assert _invoke("prepare", "--params", str(params)).exit_code == 0
    victim = sorted((tmp_path / "data" / "images").glob("*.png"))[-1]
    victim.write_bytes(victim.read_bytes()[:200])
    result = _invoke("features", "--params", str(params))
    assert result.exit_code != 0 and victim.name in result.output, result.output
    cache = tmp_path / "cache"
    assert not (cache / "features.zarr").exists()
    assert len(list((cache / "features.zarr.partial.shards").iterdir())) >= 1   # kept for the rerun


def test_label_of_another_size_is_named(tmp_path):
    params = _params(tmp_path)
    assert _invoke("synthesize", "--params", str(params)).exit_code == 0
    label = next((tmp_path / "data" / "labels").glob("*.png"))
    Image.new("L", (10, 10)).save(label)
    result = _invoke("prepare", "--params", str(params))
    assert result.exit_code != 0 and label.name in result.output, result.output


def test_unknown_parameter_is_named(tmp_path):
    params = _params(tmp_path)
    result = _invoke("features", "--params", str(params), "--set", "features.crop_szie=3")
    assert result.exit_code != 0 and "crop_szie" in result.output
