"""pseudolabels.cam_dtype: the stored CAMs' precision (float16 rounding flips ViT CAM argmaxes,
benchmarks/bench_cam_precision.py), recorded in the file, exact in float32."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline.concepts import Concepts
from pipeline.config import PseudoLabelsConfig
from pipeline.data import build_manifest, generate_synthetic
from pipeline.pseudolabels import concept_maps, write_pseudolabels
from pipeline.settings import SETTINGS
from pipeline.store import create_pseudolabel_file, encode_cams, read_cams, read_h5_attrs


def test_float32_round_trips_exactly_and_is_recorded(tmp_path):
    rng = np.random.default_rng(0)
    # attention-like values near 1 plus tiny gradient terms: float16 would merge them
    cams = (0.9 + rng.uniform(0, 1e-4, size=(3, 5, 4, 6))).astype(np.float32)
    path = tmp_path / "p.h5"
    create_pseudolabel_file(path, image_ids=["a", "b", "c"], num_concepts=5, grid=(4, 6), attrs={"dataset": "x"},
                            cam_dtype="float32")
    with h5py.File(path, "r+") as handle:
        handle["cam"][[0, 1, 2]] = cams
    with h5py.File(path, "r") as handle:
        assert handle["cam"].dtype == np.float32
        np.testing.assert_array_equal(handle["cam"][:], cams)
        attrs = read_h5_attrs(handle)
        assert attrs["cam_dtype"] == "float32" and attrs["dataset"] == "x"
    assert not np.array_equal(cams.astype(np.float16).astype(np.float32), cams)


def test_float16_is_the_default_of_the_file_and_other_dtypes_are_refused(tmp_path):
    create_pseudolabel_file(tmp_path / "p.h5", image_ids=["a"], num_concepts=2, grid=(2, 2), attrs={})
    with h5py.File(tmp_path / "p.h5", "r") as handle:
        assert handle["cam"].dtype == np.float16 and read_h5_attrs(handle)["cam_dtype"] == "float16"
    with pytest.raises(ValueError, match="cam_dtype"):
        create_pseudolabel_file(tmp_path / "q.h5", image_ids=["a"], num_concepts=2, grid=(2, 2), attrs={},
                                cam_dtype="float64")
    with pytest.raises(ValueError, match="cam_dtype"):
        PseudoLabelsConfig(cam_dtype="bfloat16")


def test_paper_settings_store_uint16_cpu_settings_float16():
    assert PseudoLabelsConfig().cam_dtype == "float32"
    for name in SETTINGS.names():
        expected = "float16" if name in ("demo", "camvid", "folder") else "uint16"
        assert SETTINGS.get(name).params()["pseudolabels"]["cam_dtype"] == expected, name


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16"])
def test_write_pseudolabels_stores_cam_dtype(dtype, vit_tiny, tmp_path):
    root = tmp_path / "data"
    generate_synthetic(root, n_train=3, n_val=1, size=(32, 32), seed=2)
    manifest = build_manifest("synthetic", root)
    rng = np.random.default_rng(0)
    concepts = Concepts(rng.normal(size=(3, vit_tiny.embed_dim)).astype(np.float32), ["all"] * 3,
                        np.ones(3, dtype=int), np.zeros(0, dtype=np.int32))
    cfg = PseudoLabelsConfig(batch_size=2, cam_dtype=dtype)
    out = write_pseudolabels(manifest, vit_tiny, concepts, cfg, tmp_path / "p.h5", image_size=(32, 32),
                             device=torch.device("cpu"), provenance={}, show_progress=False)
    expected = concept_maps(vit_tiny, manifest.batch(range(len(manifest.records)), (32, 32)),
                            torch.from_numpy(concepts.centroids), cfg).numpy()
    with h5py.File(out, "r") as handle:
        assert handle["cam"].dtype == np.dtype(dtype)
        assert read_h5_attrs(handle)["cam_dtype"] == dtype
        assert read_h5_attrs(handle)["params"]["cam_dtype"] == dtype
        stored, scale = encode_cams(expected, dtype)
        np.testing.assert_array_equal(handle["cam"][:], stored)
        np.testing.assert_array_equal(handle["cam_scale"][:], scale)
        back = np.stack([read_cams(handle, i) for i in range(len(expected))])
    # what readers get back: exact in float32; within half a step of 1/65535 of each image's
    # maximum in uint16; float16's own rounding
    top = expected.reshape(len(expected), -1).max(1)[:, None, None, None]
    tolerance = {"float32": 0.0, "uint16": 0.5 / 65535 * 1.0001, "float16": 2.0 ** -11}[dtype]
    assert (np.abs(back - expected) <= tolerance * top).all()
