"""Every stage through the CLI with a ViT (attention-gradient CAMs) on the object-centric path:
thing crops only, a background channel, the `native` and `stego` protocols."""
from __future__ import annotations

import json

import h5py
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.settings import SETTINGS

STAGES = ("synthesize", "prepare", "features", "concepts", "pseudolabels", "train", "evaluate")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vit")
    params = SETTINGS.get("demo").params()
    params["cache"] = str(tmp / "cache")
    params["synthetic"].update({"out": str(tmp / "data"), "n_train": 8, "n_val": 4, "size": [64, 64]})
    params["data"]["root"] = str(tmp / "data")
    params["backbone"].update({"name": "vit_tiny_random", "batch_size": 4})
    params["features"].update({"image_size": [64, 64], "crop_fractions": [0.5, 0.3], "crop_size": 32,
                               "pools": ["thing"]})
    params["concepts"].update({"k": {"thing": 3}, "iterations": 10})
    params["pseudolabels"].update({"background": True})
    params["train"].update({"epochs": 2, "batch_size": 4, "num_workers": 0, "bootstrap_start": 1,
                            "teacher_interval": 1})
    params["evaluate"]["protocol"] = "native"
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    runner = CliRunner()
    for stage in STAGES:
        result = runner.invoke(main, [stage, "--params", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, (stage, result.output)
    return tmp, path


def test_background_channel_and_attention_cams(run):
    tmp, _ = run
    with h5py.File(tmp / "cache" / "pseudolabels.h5", "r") as handle:
        assert handle["cam"].shape == (12, 4, 8, 8)            # 3 thing concepts + background, patch 8
        pools = json.loads(handle.attrs["concept_pools"])
        assert pools == ["thing", "thing", "thing", "background"]
        assert json.loads(handle.attrs["backbone"]) == "vit_tiny_random"


def test_native_protocol_recorded_and_other_protocols_rerun(run):
    tmp, path = run
    metrics = json.loads((tmp / "cache" / "metrics.json").read_text())
    assert metrics["evaluation"]["protocol"] == "native"
    assert metrics["model"]["num_pixels"] == 4 * 64 * 64          # 4 val labels scored at their own 64x64
    assert {metrics[row]["num_clusters"] for row in ("model", "pseudo_labels", "bottom_up")} == {4}
    result = CliRunner().invoke(main, ["evaluate", "--params", str(path), "--set", "evaluate.protocol=stego"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp / "cache" / "metrics.json").read_text())
    assert metrics["model"]["protocol"] == "stego"
    assert metrics["model"]["num_pixels"] == 4 * 320 * 320        # shortest side to 320, centre crop 320x320
    for row in ("model", "pseudo_labels", "bottom_up"):           # mIoU = mean of the defined class IoUs
        ious = [v for v in metrics[row]["per_class_iou"].values() if v is not None]
        assert metrics[row]["miou"] == pytest.approx(sum(ious) / len(ious))
