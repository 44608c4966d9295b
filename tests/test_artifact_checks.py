"""Damaged or mismatched artifacts stop the stage that reads them with an error naming the file and
what is wrong, instead of silently giving other numbers (a zarr chunk read as zeros, pseudo labels
of another K trained on)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import pipeline.features as features_module
from pipeline.concepts import Concepts, concepts_stage
from pipeline.config import Config, load_config
from pipeline.data import Manifest, build_manifest, generate_synthetic
from pipeline.errors import InputError, ProvenanceError
from pipeline.features import extract_features
from pipeline.files import partial_path
from pipeline.pseudolabels import pseudolabels_stage, write_pseudolabels
from pipeline.store import (FEATURE_ARRAYS, create_pseudolabel_file, open_features, open_features_of,
                            open_pseudolabels_of, pseudolabel_provenance, read_rows)
from pipeline.train.stage import train_stage

# 4 images of 32x32 (3 train), ViT patch 8: grid 4x4; windows of 16 px every 8 px: 9 crops per image.
FEATURES = {"image_size": [32, 32], "concept_scale": 1.0, "crop_fractions": [0.5], "crop_size": 16,
            "pools": ["all"], "chunk_images": 2}
WINDOWS = 9


def make_config(cache: Path) -> Config:
    """A config of the test backbone and sizes, its cache at `cache`."""
    path = cache.parent / "params.yaml"
    path.write_text(yaml.safe_dump({
        "cache": str(cache), "backbone": {"name": "vit_tiny_random", "device": "cpu"}, "features": FEATURES,
        "concepts": {"k": {"all": 2}, "iterations": 5}, "pseudolabels": {"batch_size": 4}}))
    return load_config(path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    root = tmp_path_factory.mktemp("images")
    generate_synthetic(root, n_train=3, n_val=1, size=(32, 32), seed=2)
    return build_manifest("synthetic", root)


def _extract(config: Config, manifest: Manifest, backbone) -> Path:
    return extract_features(manifest, backbone, config.features, config.path("features"),
                            crop_split=config.data.train_split, eval_split=config.data.eval_split,
                            batch_size=2, device=torch.device("cpu"),
                            show_progress=False)


@pytest.fixture(scope="module")
def intact_store(manifest, vit_tiny, tmp_path_factory) -> Path:
    return _extract(make_config(tmp_path_factory.mktemp("intact") / "cache"), manifest, vit_tiny)


@pytest.fixture
def config(tmp_path, manifest) -> Config:
    """A cache of its own holding the manifest."""
    config = make_config(tmp_path / "cache")
    manifest.save(config.path("manifest"))
    return config


@pytest.fixture
def store(config, intact_store) -> Path:
    """A copy of the intact feature store in `config`'s cache, to damage."""
    path = config.path("features")
    shutil.copytree(intact_store, path)
    open_features_of(config)                   # intact: opens, so what fails below is the damage
    return path


# ----------------------------------------------------------------------------- feature store shards
# Shards of 2 images: images 0, 1 | 2, 3. 'patch' holds image 3 (val) only: shard 1; the crop
# arrays images 0..2 (train): shards 0 and 1, of 2 x 9 crop rows each.
def test_rows_of_zeros_are_stored_and_rows_of_images_without_them_are_not(config, manifest, vit_tiny, monkeypatch):
    # Every window classed 'none': the crop embeddings and kinds of the train images are zeros
    # (stored: NaN and 255 are the fill values); the val image has no crop rows at all.
    monkeypatch.setattr(features_module, "classify_windows",
                        lambda fg, boxes, *args: (np.zeros(len(boxes), dtype=np.uint8), np.zeros(len(boxes))))
    config.features.pools = ["thing", "stuff"]
    path = _extract(config, manifest, vit_tiny)
    root = open_features(path, verify=True)
    train_rows = slice(0, 3 * WINDOWS)
    assert not read_rows(root, "crops/kind", train_rows).any()
    assert not read_rows(root, "crops/embedding", train_rows).any()
    with pytest.raises(InputError, match=rf"array 'crops/kind' does not hold row {3 * WINDOWS} \(image 3\): "
                                         r"crops are stored for the crop split"):
        read_rows(root, "crops/kind", slice(0, 4 * WINDOWS))
    for name in FEATURE_ARRAYS:
        stored = sorted(p.name for p in (path / name).iterdir() if p.name != "zarr.json")
        expected = {"patch": ["c.1.0.0.0"]}.get(name, [f"c.{s}{'.0' * (root[name].ndim - 1)}" for s in (0, 1)])
        assert stored == expected, name


def test_deleted_shards_are_named_when_a_stage_opens_the_store(config, store):
    (store / "patch" / "c.1.0.0.0").unlink()
    (store / "crops" / "kind" / "c.0").unlink()
    with pytest.raises(InputError) as info:
        concepts_stage(config)
    message = str(info.value)
    assert message.startswith(f"{store}: damaged feature store")
    assert "array 'patch' lacks 1 of its 1 shard files: c.1.0.0.0 (rows 2..3)" in message
    assert f"array 'crops/kind' lacks 1 of its 2 shard files: c.0 (rows 0..{2 * WINDOWS - 1})" in message
    assert "'embedding'" not in message and "'patch_sample'" not in message        # only the damaged arrays
    assert f"dvc checkout --force {store}, or rerun the features stage: dvc repro -f -s features" in message
    assert not config.path("concepts").exists()


def test_missing_array_is_named(config, store):
    shutil.rmtree(store / "patch_sample")
    with pytest.raises(InputError, match=r"array 'patch_sample' is missing"):
        open_features_of(config)


def _no_zarr_traceback(error: BaseException) -> None:
    assert error.__cause__ is None and error.__suppress_context__
    assert "site-packages" not in "".join(traceback.format_exception(error))


def test_corrupt_shard_read_by_the_concepts_stage_is_named(config, store):
    (store / "crops" / "embedding" / "c.1.0").write_bytes(b"not a shard")
    with pytest.raises(InputError) as info:
        concepts_stage(config)
    message = str(info.value)
    assert message.startswith(f"{store}: array 'crops/embedding': shard c.1.0 (rows {2 * WINDOWS}..{4 * WINDOWS - 1}) "
                              f"cannot be decoded")
    assert "dvc repro -f -s features" in message
    _no_zarr_traceback(info.value)
    assert not config.path("concepts").exists()


def test_read_rows_names_the_damaged_shard_and_reads_the_others(config, store, intact_store):
    (store / "patch" / "c.1.0.0.0").write_bytes(b"\x00" * 7)
    flipped = store / "saliency" / "c.0.0.0"        # one flipped bit of image 0: caught by its chunk's CRC32C
    data = bytearray(flipped.read_bytes())
    data[4] ^= 0x01
    flipped.write_bytes(bytes(data))
    root, intact = open_features_of(config), open_features(intact_store)
    with pytest.raises(InputError, match=rf"^{store}: array 'patch': shard c\.1\.0\.0\.0 \(rows 2\.\.3\) cannot") as info:
        read_rows(root, "patch", 3)
    _no_zarr_traceback(info.value)
    with pytest.raises(InputError, match=r"array 'saliency': shard c\.0\.0\.0 \(rows 0\.\.1\) cannot be decoded"):
        read_rows(root, "saliency", np.array([3, 0]))
    np.testing.assert_array_equal(read_rows(root, "saliency", np.array([3, 1])), intact["saliency"][[3, 1]])
    np.testing.assert_array_equal(read_rows(root, "embedding", 3), intact["embedding"][3])
    with pytest.raises(InputError, match=r"array 'patch' does not hold row 2 \(image 2\): patch features are "
                                         r"stored for the evaluation split only"):
        read_rows(intact, "patch", 2)
    with pytest.raises(IndexError):                 # a bad selection stays the caller's error
        read_rows(root, "patch", 9)


# ----------------------------------------------------------------------------- provenance
def _concepts(k: int, seed: int, dim: int = 96) -> Concepts:
    centroids = np.random.default_rng(seed).normal(size=(k, dim)).astype(np.float32)
    return Concepts(centroids, ["all"] * k, np.ones(k, dtype=np.int64), np.zeros(0, dtype=np.int32))


@pytest.mark.parametrize("labels_concepts, field, other_field", [
    (_concepts(3, seed=1), "num_concepts: artifact has 3, this run expects 2", None),
    (_concepts(2, seed=1), "concepts_hash: artifact has", "num_concepts"),
])
def test_train_refuses_pseudo_labels_of_other_concepts_and_keeps_last_pt(config, manifest, vit_tiny, labels_concepts,
                                                                        field, other_field):
    current = _concepts(2, seed=0)
    current.save(config.path("concepts"), {"backbone": vit_tiny.name, "weights_id": vit_tiny.weights_id})
    ids = [r.id for r in manifest.records]
    labels = config.path("pseudolabels")

    def write_labels(concepts: Concepts) -> None:
        attrs = pseudolabel_provenance(vit_tiny, concepts, ids, image_size=config.image_size, background=False)
        create_pseudolabel_file(labels, image_ids=ids, num_concepts=attrs["num_concepts"], grid=attrs["grid"],
                                attrs=attrs)

    write_labels(current)
    open_pseudolabels_of(config, vit_tiny, current, manifest).close()   # the same concepts pass
    write_labels(labels_concepts)
    last = config.path("model").parent / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"the good run")
    with pytest.raises(ProvenanceError) as info:
        train_stage(config)
    message = str(info.value)
    assert message.startswith(f"{labels}: written by another configuration") and field in message
    assert other_field is None or other_field not in message
    assert last.read_bytes() == b"the good run"
    assert not config.path("model").exists()


def test_written_pseudo_labels_pass_their_check_and_fail_another_run(config, manifest, vit_tiny):
    concepts = _concepts(2, seed=0)
    write_pseudolabels(manifest, vit_tiny, concepts, config.pseudolabels, config.path("pseudolabels"),
                       image_size=config.image_size, device=torch.device("cpu"), provenance={}, show_progress=False)
    open_pseudolabels_of(config, vit_tiny, concepts, manifest).close()
    reordered = dataclasses.replace(manifest, records=manifest.records[::-1])
    with pytest.raises(ProvenanceError, match=r"pseudolabels\.h5: written by .*\n  images_hash: artifact has"):
        open_pseudolabels_of(config, vit_tiny, concepts, reordered)
    config.pseudolabels.background = True
    with pytest.raises(ProvenanceError, match=r"num_concepts: artifact has 2, this run expects 3"):
        open_pseudolabels_of(config, vit_tiny, concepts, manifest)
    config.features.image_size = [48, 32]
    with pytest.raises(ProvenanceError, match=r"grid: artifact has \[4, 4\], this run expects \[6, 4\]"):
        open_pseudolabels_of(config, vit_tiny, concepts, manifest)


def test_pseudolabels_stage_refuses_concepts_of_other_weights(config, vit_tiny):
    concepts_dir = config.path("concepts")
    _concepts(2, seed=0).save(concepts_dir, {"backbone": vit_tiny.name, "weights_id": "sha256-of-other-weights"})
    with pytest.raises(ProvenanceError) as info:
        pseudolabels_stage(config)
    message = str(info.value)
    assert message.startswith(f"{concepts_dir / 'concepts.json'}: written by another configuration")
    assert f"weights_id: artifact has 'sha256-of-other-weights', this run expects '{vit_tiny.weights_id}'" in message
    assert "backbone" not in message
    assert not config.path("pseudolabels").exists() and not partial_path(config.path("pseudolabels")).exists()


def test_a_damaged_shard_hard_linked_into_dvc_cache_names_the_cached_object(config, store, tmp_path):
    # DVC hard-links its outputs into .dvc/cache (.dvc/config): a damaged shard damages DVC's copy
    # too, so `dvc checkout` would bring the damage back; the message says to remove that object.
    shard = store / "crops" / "embedding" / "c.1.0"
    project = store.parents[1]                    # <project>/cache/features.zarr
    cached = project / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef0123"
    cached.parent.mkdir(parents=True)
    os.link(shard, cached)
    shard.write_bytes(b"not a shard")             # in place: the linked object is damaged too
    with pytest.raises(InputError) as info:
        concepts_stage(config)
    message = str(info.value)
    assert f"rm -f {cached} && dvc repro -f -s features && dvc checkout --relink {store}" in message
    assert "dvc checkout --force" not in message


# ----------------------------------------------------------------------------- pseudo-label file damage
@pytest.fixture
def labels(config, manifest, vit_tiny) -> Path:
    """Intact pseudo labels of 2 concepts in `config`'s cache, and a training config that reads
    every training image (batches of 1, one epoch)."""
    concepts = _concepts(2, seed=0)
    concepts.save(config.path("concepts"), {"backbone": vit_tiny.name, "weights_id": vit_tiny.weights_id})
    path = write_pseudolabels(manifest, vit_tiny, concepts, config.pseudolabels, config.path("pseudolabels"),
                              image_size=config.image_size, device=torch.device("cpu"),
                              provenance={"backbone": vit_tiny.name, "weights_id": vit_tiny.weights_id,
                                          "dataset": manifest.dataset}, show_progress=False)
    config.train.epochs, config.train.batch_size, config.train.image_cache = 1, 1, False
    return path


def test_a_truncated_pseudolabel_file_is_named_with_its_repair(config, labels):
    labels.write_bytes(labels.read_bytes()[:len(labels.read_bytes()) // 2])
    with pytest.raises(InputError) as info:
        train_stage(config)
    message = str(info.value)
    assert message.startswith(f"{labels}: HDF5 cannot open it (OSError: ")
    assert f"the file is damaged; restore it: dvc checkout --force {labels}, or rerun the pseudolabels stage: " \
           f"dvc repro -f -s pseudolabels" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_overwritten_cam_bytes_fail_their_checksum_even_in_a_loader_worker(config, labels, workers):
    import h5py

    with h5py.File(labels, "r") as handle:
        chunk = handle["cam"].id.get_chunk_info_by_coord((1, 0, 0, 0))
    with open(labels, "r+b") as f:                # bytes changed behind HDF5's back, as a disk error would:
        f.seek(chunk.byte_offset + 4)             # finite values, wrong (no NaN check would see them)
        f.write(b"\x12\x34" * 4)
    config.train.num_workers = workers
    with pytest.raises(InputError) as info:      # an InputError (one line from the CLI), not a worker's traceback
        train_stage(config)
    message = str(info.value)
    assert message.startswith(f"{labels}: image 1's CAMs cannot be read (OSError: ")
    assert "the file is damaged" in message and "dvc repro -f -s pseudolabels" in message
    assert not config.path("model").exists()


def test_cams_without_checksums_that_hold_nan_are_refused(config, labels):
    import h5py

    from pipeline.store import CamReader

    with h5py.File(labels, "r+") as handle:      # what an older file (no checksums) could hold after damage
        cam = handle["cam"][2]
        cam[0, 0, 0] = np.nan
        handle["cam"][2] = cam
    with pytest.raises(InputError, match=r"pseudolabels\.h5: image 2's CAMs hold NaN or infinite values; the file "
                                         r"is damaged"):
        CamReader(labels, [0, 1, 2])(2)


def test_a_file_the_system_will_not_open_is_not_called_damaged(labels, monkeypatch):
    import h5py

    from pipeline.store import open_h5

    def locked(*args, **kwargs):                  # another process holds it open for writing
        raise BlockingIOError(11, "Unable to synchronously open file (unable to lock file)")

    monkeypatch.setattr(h5py, "File", locked)
    with pytest.raises(InputError) as info:
        open_h5(labels)
    message = str(info.value)
    assert message.startswith(f"{labels}: HDF5 cannot open it: BlockingIOError: ") and "unable to lock file" in message
    assert "damaged" not in message and "dvc" not in message     # an intact file: no repair to run
