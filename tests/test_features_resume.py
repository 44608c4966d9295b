"""The features and pseudolabels stages: interrupted runs leave no complete-looking artifact and resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import pipeline.features as features_module
from pipeline.concepts import Concepts
from pipeline.config import FeaturesConfig, PseudoLabelsConfig
from pipeline.data import build_manifest, generate_synthetic
from pipeline.features import extract_features
from pipeline.pseudolabels import write_pseudolabels
from pipeline.store import FEATURE_ARRAYS, partial_path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, n_train=6, n_val=2, size=(64, 64), seed=1)
    return build_manifest("synthetic", root)


CFG = FeaturesConfig(image_size=[64, 64], concept_scale=1.0, crop_fractions=[0.5], crop_size=32,
                     pools=["thing", "stuff"], chunk_images=2)


def _run(manifest, backbone, out):
    return extract_features(manifest, backbone, CFG, out, crop_split="train", eval_split="val",
                            batch_size=2, device=torch.device("cpu"), show_progress=False)


def test_features_interrupted_then_resumed_equal_one_run(manifest, vit_tiny, tmp_path, monkeypatch):
    reference = zarr.open_group(str(_run(manifest, vit_tiny, tmp_path / "once.zarr")), mode="r")

    real = features_module.write_feature_shard
    calls = []

    def failing(root, manifest_, start, stop, **kwargs):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(root, manifest_, start, stop, **kwargs)

    out = tmp_path / "features.zarr"
    monkeypatch.setattr(features_module, "write_feature_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(manifest, vit_tiny, out)
    assert not out.exists() and partial_path(out).exists()     # nothing looks complete

    resumed_shards = []

    def counting(root, manifest_, start, stop, **kwargs):
        resumed_shards.append(start)
        return real(root, manifest_, start, stop, **kwargs)

    monkeypatch.setattr(features_module, "write_feature_shard", counting)
    _run(manifest, vit_tiny, out)
    assert resumed_shards == [4, 6]                               # shards 0 and 2 were kept
    assert out.exists() and not partial_path(out).exists()
    resumed = zarr.open_group(str(out), mode="r")
    for name in FEATURE_ARRAYS:
        np.testing.assert_array_equal(resumed[name][:], reference[name][:], err_msg=name)


def test_pseudolabels_resume_and_match(manifest, vit_tiny, tmp_path, monkeypatch):
    import h5py

    import pipeline.pseudolabels as pl

    rng = np.random.default_rng(0)
    concepts = Concepts(rng.normal(size=(3, vit_tiny.embed_dim)).astype(np.float32), ["all"] * 3,
                        np.ones(3, dtype=int), np.zeros(0, dtype=np.int32))
    cfg = PseudoLabelsConfig(batch_size=2)
    monkeypatch.setattr(pl, "BATCHES_PER_SHARD", 1)      # shards of one batch: 4 shards of 2 images
    kwargs = dict(image_size=(64, 64), device=torch.device("cpu"), provenance={"backbone": vit_tiny.name},
                  show_progress=False)
    once = write_pseudolabels(manifest, vit_tiny, concepts, cfg, tmp_path / "once.h5", **kwargs)

    real, calls = pl.concept_maps, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kw)

    out = tmp_path / "pseudolabels.h5"
    monkeypatch.setattr(pl, "concept_maps", failing)
    with pytest.raises(KeyboardInterrupt):
        write_pseudolabels(manifest, vit_tiny, concepts, cfg, out, **kwargs)
    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as handle:
        assert handle["done"][:].sum() == 4                       # two batches of two were kept
    monkeypatch.setattr(pl, "concept_maps", real)
    write_pseudolabels(manifest, vit_tiny, concepts, cfg, out, **kwargs)
    with h5py.File(out, "r") as a, h5py.File(once, "r") as b:
        np.testing.assert_array_equal(a["cam"][:], b["cam"][:])
        np.testing.assert_array_equal(a["label"][:], b["label"][:])
        assert a["done"][:].all()
