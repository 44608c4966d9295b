"""Config parsing, atomic outputs, shard bookkeeping and provenance checks."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import InputError, ProvenanceError
from pipeline.files import commit, partial_path
from pipeline.store import ShardLog, check_provenance, create_feature_store, features_as_dask, open_features, shards


@pytest.mark.parametrize("section, typo, meant, value", [
    ("features", "image_sise", "image_size", "[224, 224]"),
    ("train", "epohcs", "epochs", "3"),          # train is typed like every other section
])
def test_unknown_key_is_an_error_naming_the_file_and_the_key_meant(tmp_path, section, typo, meant, value):
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {typo}: {value}\n")
    with pytest.raises(InputError, match=rf"params.yaml: unknown key\(s\) in '{section}': '{typo}' "
                                         rf"\(did you mean '{meant}'\?\)"):
        load_config(path)


def test_invalid_train_value_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  cam_norm: sample\n")
    with pytest.raises(InputError, match=r"params.yaml: 'train': cam_norm must be one of image, concept"):
        load_config(path)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    config = load_config(path, ["train.epochs=5", "features.image_size=[64, 96]", "concepts.k={all: 3}"])
    assert config.train.epochs == 5
    assert config.features.image_size == [64, 96]
    assert config.concepts.k == {"all": 3}


def test_missing_params_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shards_cover_range_once():
    ranges = list(shards(10, 4))
    assert ranges == [(0, 4), (4, 8), (8, 10)]


def test_shard_log(tmp_path):
    log = ShardLog(tmp_path / "log")
    assert not log.done(0, 4)
    log.mark(0, 4)
    assert log.done(0, 4) and not log.done(4, 8)
    log.clear()
    assert not log.done(0, 4)


def test_commit_replaces_folder_and_keeps_old_until_new_is_complete(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    partial = partial_path(final)
    partial.mkdir()
    (partial / "new.txt").write_text("new")
    commit(partial, final)
    assert (final / "new.txt").read_text() == "new"
    assert not (final / "old.txt").exists()
    assert not partial.exists()


def test_provenance_mismatch_names_the_key(tmp_path):
    check_provenance(tmp_path, {"backbone": "a", "size": [1, 2]}, {"size": (1, 2)})
    with pytest.raises(ProvenanceError, match="backbone: artifact has 'a', this run expects 'b'"):
        check_provenance(tmp_path, {"backbone": "a"}, {"backbone": "b"})


def test_feature_store_layout_and_lazy_dask(tmp_path):
    path = tmp_path / "features.zarr"
    root = create_feature_store(path, n_images=3, grid=(2, 3), dim=4, windows_per_image=5, shard_images=2,
                                attrs={"backbone": "x"})
    root["patch"][1:2] = np.ones((1, 2, 3, 4), dtype=np.float16)
    assert root["patch"].chunks == (1, 2, 3, 4) and root["patch"].shards == (2, 2, 3, 4)
    assert root["crops/embedding"].shape == (15, 4) and root["crops/embedding"].shards == (10, 4)
    arrays = features_as_dask(path)
    assert float(np.nansum(arrays["patch"].compute())) == 24.0      # rows never written are NaN
    assert arrays["crops/kind"].dtype == np.uint8
    opened = open_features(path, expected={"backbone": "x"})
    assert opened.attrs["backbone"] == "x"
    with pytest.raises(ProvenanceError):
        open_features(path, expected={"backbone": "y"})


def test_missing_feature_store_says_what_to_run(tmp_path):
    with pytest.raises(InputError, match="run the features stage first"):
        open_features(tmp_path / "features.zarr")


def test_stale_training_checkpoint_is_dropped_when_inputs_change(tmp_path):
    from pipeline.train.stage import forget_stale_checkpoint

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    last = model_dir / "last.pt"
    forget_stale_checkpoint(model_dir, {"labels": "a"})
    last.write_bytes(b"checkpoint")
    forget_stale_checkpoint(model_dir, {"labels": "a"})      # same inputs: resume from it
    assert last.exists()
    forget_stale_checkpoint(model_dir, {"labels": "b"})      # new pseudo labels: start over
    assert not last.exists()


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", r"'train.epochs' must be an integer; got 'abc'"),
    ("train.lr=-1", r"'train': lr must be > 0"),
    ("train.decoder_dim=abc", r"'train.decoder_dim' must be an integer or null; got 'abc'"),
    ("evaluate.crf=maybe", r"'evaluate.crf' must be true or false; got 'maybe'"),
])
def test_override_of_the_wrong_type_names_the_key_and_the_override(tmp_path, override, message):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    with pytest.raises(InputError, match=rf"params.yaml \(with --set {re.escape(override)}\): {message}"):
        load_config(path, [override])
    assert load_config(path, ["train.lr=0.001", "train.decoder_dim=null"]).train.lr == 0.001   # ints for floats too
