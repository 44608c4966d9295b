"""features and pseudolabels on a real dask LocalCluster (2 worker processes, CPU) write exactly
what the in-process run writes: every array of the feature store and of the pseudo labels.

The demo's EfficientNet at 96x96: its CPU kernels sum in an order that depends on the torch
thread count (a tiny ViT's do not), so this also checks that the workers compute with the
stage's own thread count (compute.torch_threads: null)."""
from __future__ import annotations

import shutil
import sys

import h5py
import numpy as np
import pytest
import yaml
import zarr

from pipeline.concepts import concepts_stage
from pipeline.config import load_config
from pipeline.data import build_manifest, generate_synthetic
from pipeline.features import features_stage
from pipeline.pseudolabels import pseudolabels_stage
from pipeline.store import FEATURE_ARRAYS

pytest.importorskip("distributed", reason="dask.distributed not installed (pip install -e .)")


def _config(tmp, cache: str, scheduler: str):
    params = tmp / f"params_{cache}.yaml"
    params.write_text(yaml.safe_dump({
        "cache": str(tmp / cache), "backbone": {"name": "efficientnet_lite0", "device": "cpu", "batch_size": 2},
        "data": {"dataset": "synthetic", "root": str(tmp / "images")},
        "features": {"image_size": [96, 96], "concept_scale": 1.0, "crop_fractions": [0.5], "crop_size": 48,
                     "pools": ["thing", "stuff"], "chunk_images": 3, "bottom_up_samples": 20},
        "concepts": {"k": {"thing": 2, "stuff": 2}, "iterations": 3},
        "pseudolabels": {"batch_size": 2, "cam_dtype": "uint16"},
        "compute": {"scheduler": scheduler, "workers": 2}}))
    return load_config(params)


def test_dask_run_equals_the_in_process_run(tmp_path, monkeypatch):
    generate_synthetic(tmp_path / "images", n_train=8, n_val=3, size=(96, 96), seed=4)
    local, dask = _config(tmp_path, "local", "local"), _config(tmp_path, "dask", "dask")
    build_manifest("synthetic", tmp_path / "images").save(local.path("manifest"))
    features_stage(local)
    concepts_stage(local)
    pseudolabels_stage(local)
    # the same manifest and concepts, so that the two runs differ by their executor only
    dask.path("manifest").parent.mkdir(parents=True)
    shutil.copy(local.path("manifest"), dask.path("manifest"))
    shutil.copytree(local.path("concepts"), dask.path("concepts"))
    # the stage's own process resolves no device for a dask run: a client on a login node
    # without a GPU must neither refuse `device: cuda` nor pick the CPU for its GPU workers
    def resolved_on_the_client(name):
        raise AssertionError(f"device {name!r} resolved in the stage's own process")

    for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "pipeline"]:
        if hasattr(module, "resolve_device"):       # wherever a module holds the function
            monkeypatch.setattr(module, "resolve_device", resolved_on_the_client)
    features_stage(dask)
    pseudolabels_stage(dask)

    ours, theirs = (zarr.open_group(str(c.path("features")), mode="r") for c in (local, dask))
    for name in FEATURE_ARRAYS:
        np.testing.assert_array_equal(theirs[name][:], ours[name][:], err_msg=name)
    assert dict(theirs.attrs) == dict(ours.attrs)
    with h5py.File(local.path("pseudolabels"), "r") as a, h5py.File(dask.path("pseudolabels"), "r") as b:
        for name in ("cam", "cam_scale", "label", "done", "image_id"):
            np.testing.assert_array_equal(b[name][:], a[name][:], err_msg=name)
