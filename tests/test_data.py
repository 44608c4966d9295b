"""Tests of pipeline.data: image/label IO, the manifest, every dataset reader, the generator.

Each reader is tested on a tiny fixture written in its real on-disk format (JPEG/PNG
images, palette PNGs for VOC, labelIds for Cityscapes, ...) under tmp_path.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import (
    DATASETS,
    ImageRecord,
    Manifest,
    build_manifest,
    generate_synthetic,
    get_reader,
    load_image,
    load_label,
    read_size,
    resize_image,
    resize_label,
)
from pipeline.data import readers as readers_mod
from pipeline.data.readers import DatasetReader, Entry, LabelDecoder, Scan, voc_colormap
from pipeline.data.synthetic import CLASS_NAMES
from pipeline.errors import InputError

CAMVID_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"


# ----------------------------------------------------------------------------- helpers
def rgb(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_image(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb(h, w, seed)
    Image.fromarray(arr).save(path)
    return arr


def save_label(path: Path, arr: np.ndarray, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if palette is not None:
        img.putpalette(palette.astype(np.uint8).tobytes())  # an L image with a palette is saved as mode P
    img.save(path)


def label_with(values: list[int], h: int = 12, w: int = 16) -> np.ndarray:
    """A label map holding each of ``values`` in a block of rows."""
    arr = np.zeros((h, w), dtype=np.uint8)
    for i, v in enumerate(values):
        arr[i * h // len(values):(i + 1) * h // len(values)] = v
    return arr


def problem(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# ----------------------------------------------------------------------------- images
class TestLoadImage:
    def test_rgb_roundtrip(self, tmp_path):
        arr = save_image(tmp_path / "a.png")
        out = load_image(tmp_path / "a.png")
        assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
        np.testing.assert_array_equal(out, arr)

    def test_grayscale_becomes_three_equal_channels(self, tmp_path):
        gray = rgb()[..., 0]
        Image.fromarray(gray).save(tmp_path / "g.png")
        out = load_image(tmp_path / "g.png")
        assert out.shape == (12, 16, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], gray)

    def test_rgba_drops_alpha(self, tmp_path):
        arr = np.dstack([rgb(), np.full((12, 16), 7, np.uint8)])
        Image.fromarray(arr).save(tmp_path / "a.png")
        np.testing.assert_array_equal(load_image(tmp_path / "a.png"), arr[..., :3])

    def test_palette_uses_palette_colours(self, tmp_path):
        idx = label_with([0, 1, 2])
        save_label(tmp_path / "p.png", idx, palette=voc_colormap())
        assert Image.open(tmp_path / "p.png").mode == "P"
        out = load_image(tmp_path / "p.png")
        np.testing.assert_array_equal(out, voc_colormap()[idx])

    def test_16bit_is_scaled_to_8bit(self, tmp_path):
        arr16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16).repeat(3, axis=0)
        Image.fromarray(arr16).save(tmp_path / "d.png")
        out = load_image(tmp_path / "d.png")
        assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
        np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])

    def test_jpeg_and_size_from_header(self, tmp_path):
        save_image(tmp_path / "a.jpg", 20, 30)
        assert load_image(tmp_path / "a.jpg").shape == (20, 30, 3)
        assert read_size(tmp_path / "a.jpg") == (20, 30)

    @pytest.mark.parametrize("suffix", [".png", ".jpg"])
    def test_truncated_file_names_the_file(self, tmp_path, suffix):
        path = tmp_path / f"t{suffix}"
        save_image(path, 64, 64)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError) as exc:
            load_image(path)
        assert problem(exc).startswith(str(path))
        assert "truncated" in problem(exc)

    def test_non_image_and_missing(self, tmp_path):
        (tmp_path / "notes.png").write_text("not an image")
        with pytest.raises(InputError, match="not an image"):
            load_image(tmp_path / "notes.png")
        with pytest.raises(InputError, match="does not exist"):
            load_image(tmp_path / "missing.png")
        with pytest.raises(InputError, match="not an image"):
            read_size(tmp_path / "notes.png")


class TestResize:
    def test_resize_image_bilinear(self):
        img = rgb(12, 16)
        out = resize_image(img, (24, 8))
        assert out.shape == (24, 8, 3) and out.dtype == np.uint8
        flat = np.full((10, 10, 3), 77, np.uint8)
        np.testing.assert_array_equal(resize_image(flat, (5, 7)), np.full((5, 7, 3), 77, np.uint8))

    def test_resize_label_nearest_keeps_values(self):
        lbl = label_with([3, 255, 9], 12, 16)
        out = resize_label(lbl, (7, 5))
        assert out.shape == (7, 5) and out.dtype == np.uint8
        assert set(np.unique(out)) <= {3, 9, 255}
        assert resize_label(lbl, (12, 16)) is not lbl

    def test_resize_rejects_wrong_dtype(self):
        with pytest.raises(TypeError):
            resize_label(np.zeros((4, 4), np.int64), (2, 2))


class TestLoadLabel:
    def test_size_mismatch(self, tmp_path):
        save_label(tmp_path / "l.png", label_with([1, 2]))
        with pytest.raises(InputError) as exc:
            load_label(tmp_path / "l.png", "camvid", 11, expect_size=(10, 16))
        assert problem(exc).startswith(str(tmp_path / "l.png"))
        assert "12x16" in problem(exc) and "10x16" in problem(exc)

    def test_out_of_range_values_are_listed(self, tmp_path):
        save_label(tmp_path / "l.png", label_with([0, 3, 12, 40]))
        with pytest.raises(InputError) as exc:
            load_label(tmp_path / "l.png", "camvid", 11)
        assert "[12, 40]" in problem(exc) and "0..10" in problem(exc)

    def test_num_classes_bounds_identity_labels(self, tmp_path):
        save_label(tmp_path / "l.png", label_with([0, 6, 7]))
        with pytest.raises(InputError, match=r"\[7\]"):
            load_label(tmp_path / "l.png", "synthetic", 7)
        save_label(tmp_path / "ok.png", label_with([0, 6, 255]))
        assert set(np.unique(load_label(tmp_path / "ok.png", "synthetic", 7))) == {0, 6, 255}

    def test_multichannel_label_is_rejected(self, tmp_path):
        arr = np.dstack([label_with([1, 2]), label_with([2, 1]), label_with([1, 2])])
        Image.fromarray(arr).save(tmp_path / "rgb.png")
        with pytest.raises(InputError, match="3 channels"):
            load_label(tmp_path / "rgb.png", "camvid", 11)

    def test_grey_saved_as_rgb_is_accepted(self, tmp_path):
        lbl = label_with([1, 2, 11])
        Image.fromarray(np.dstack([lbl] * 3)).save(tmp_path / "grey_rgb.png")
        out = load_label(tmp_path / "grey_rgb.png", "camvid", 11)
        assert set(np.unique(out)) == {1, 2, 255}

    def test_decoder_table_and_16bit(self, tmp_path):
        dec = LabelDecoder("t", {0: 0, 5: 1, 300: 2})
        raw = np.array([[0, 5, 300, 255]], dtype=np.uint16)
        np.testing.assert_array_equal(dec.decode(raw, "I;16", 3, tmp_path / "x"), [[0, 1, 2, 255]])
        with pytest.raises(InputError, match=r"\[301\]"):
            dec.decode(np.array([[301]], dtype=np.uint16), "I;16", 3, tmp_path / "x")


# ----------------------------------------------------------------------------- manifest
class TestManifest:
    def make(self) -> Manifest:
        recs = [ImageRecord("a", "train", "/x/a.png", "/x/a_l.png", 10, 20),
                ImageRecord("b", "val", "b.png", None, 5, 6)]
        return Manifest("camvid", ["c0", "c1"], 255, recs, root="/data/root", options={"splits": ["train"]})

    def test_roundtrip_atomic(self, tmp_path):
        m = self.make()
        path = tmp_path / "sub" / "manifest.json"
        m.save(path)
        assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]
        again = Manifest.load(path)
        assert again == m
        data = json.loads(path.read_text())
        assert data["ignore_index"] == 255 and data["records"][0]["height"] == 10

    def test_split_and_resolve(self):
        m = self.make()
        assert [r.id for r in m.split("val")] == ["b"]
        assert m.splits == ["train", "val"] and m.num_classes == 2 and len(m) == 2
        with pytest.raises(InputError, match="split 'test'.*train, val"):
            m.split("test")
        assert m.resolve("b.png") == Path("/data/root/b.png")
        assert m.resolve("/x/a.png") == Path("/x/a.png")

    def test_bad_manifest_file(self, tmp_path):
        (tmp_path / "m.json").write_text("{not json")
        with pytest.raises(InputError, match="unreadable manifest"):
            Manifest.load(tmp_path / "m.json")
        (tmp_path / "m2.json").write_text("{}")
        with pytest.raises(InputError, match="missing key"):
            Manifest.load(tmp_path / "m2.json")


# ----------------------------------------------------------------------------- registry
class TestRegistry:
    def test_all_readers_registered(self):
        assert set(DATASETS.names()) >= {"synthetic", "camvid", "folder", "cocostuff27", "cocostuff171", "coco80",
                                        "cityscapes27", "voc21", "lip5", "lip16", "lip19"}

    def test_unknown_dataset_and_option(self, tmp_path):
        with pytest.raises(InputError, match="unknown dataset 'nope'"):
            build_manifest("nope", tmp_path)
        with pytest.raises(InputError, match="unknown option.*colour.*accepted: splits"):
            build_manifest("camvid", tmp_path, colour=True)
        with pytest.raises(InputError, match="does not exist"):
            build_manifest("camvid", tmp_path / "absent")

    def test_register_custom_reader(self, tmp_path):
        save_image(tmp_path / "one.png")

        @DATASETS.register("_test_custom")
        class Custom(DatasetReader):
            decoder = LabelDecoder("_test_custom")

            def scan(self, root, *, tag="x"):
                return Scan([Entry(tag, "one", root / "one.png", None)], ["only"])

        try:
            m = build_manifest("_test_custom", tmp_path, tag="mine")
            assert m.records[0].split == "mine" and (m.records[0].height, m.records[0].width) == (12, 16)
            with pytest.raises(ValueError, match="already registered"):
                DATASETS.register("_test_custom", Custom)
        finally:
            DATASETS._entries.pop("_test_custom")
            get_reader.cache_clear()

    def test_duplicate_ids_across_splits(self, tmp_path):
        root = tmp_path / "voc"
        make_voc(root)
        (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt").write_text("2007_000001\n")
        with pytest.raises(InputError, match="occurs twice"):
            build_manifest("voc21", root, splits=["train", "trainval"])


# ----------------------------------------------------------------------------- synthetic
class TestSynthetic:
    def test_layout_determinism_and_reader(self, tmp_path):
        generate_synthetic(tmp_path / "a", n_train=8, n_val=3, size=(64, 80), seed=3)
        generate_synthetic(tmp_path / "b", n_train=8, n_val=3, size=(64, 80), seed=3)
        generate_synthetic(tmp_path / "c", n_train=8, n_val=3, size=(64, 80), seed=4)
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
        assert len([f for f in files if f.parts[0] == "images"]) == 11
        for f in files:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        img = "images/train_00000.png"
        assert (tmp_path / "a" / img).read_bytes() != (tmp_path / "c" / img).read_bytes()

        m = build_manifest("synthetic", tmp_path / "a")
        assert m.class_names == CLASS_NAMES and 6 <= len(CLASS_NAMES) <= 8
        assert [len(m.split(s)) for s in ("train", "val")] == [8, 3]
        assert all((r.height, r.width) == (64, 80) for r in m.records)
        seen = set()
        for r in m.records:
            lbl = load_label(m.resolve(r.label), "synthetic", len(m.class_names), (r.height, r.width))
            seen |= set(np.unique(lbl).tolist())
            assert load_image(m.resolve(r.image)).shape == (64, 80, 3)
        assert len(seen) >= 5  # stuff and thing classes both show up

    def test_val_images_do_not_depend_on_train_count(self, tmp_path):
        generate_synthetic(tmp_path / "a", 2, 2, (32, 32), 0)
        generate_synthetic(tmp_path / "b", 5, 2, (32, 32), 0)
        for name in ("val_00001.png", "train_00001.png"):
            assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()

    def test_regenerate_replaces_but_never_clobbers_other_folders(self, tmp_path):
        generate_synthetic(tmp_path / "s", 3, 1, (32, 32), 0)
        generate_synthetic(tmp_path / "s", 1, 1, (32, 32), 0)
        assert len(list((tmp_path / "s" / "images").iterdir())) == 2
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("x")
        with pytest.raises(InputError, match="refusing to overwrite"):
            generate_synthetic(tmp_path / "mine", 1, 1, (32, 32), 0)
        assert (tmp_path / "mine" / "thesis.tex").exists()

    def test_fast_enough(self, tmp_path):
        start = time.perf_counter()
        generate_synthetic(tmp_path / "s", 20, 0, (224, 224), 0)
        assert time.perf_counter() - start < 10.0  # ~15 ms per image on a laptop core

    def test_missing_pieces_are_listed(self, tmp_path):
        generate_synthetic(tmp_path / "s", 2, 1, (32, 32), 0)
        (tmp_path / "s" / "val.txt").unlink()
        with pytest.raises(InputError) as exc:
            build_manifest("synthetic", tmp_path / "s")
        assert "missing val.txt" in problem(exc) and "images/" not in problem(exc)
        (tmp_path / "s" / "labels" / "train_00001.png").unlink()
        with pytest.raises(InputError, match="1 train label file.*labels/train_00001.png"):
            build_manifest("synthetic", tmp_path / "s", splits="train")


# ----------------------------------------------------------------------------- CamVid
def make_camvid(root: Path) -> None:
    for split, names in (("train", ["0001TP_000010", "0001TP_000020"]), ("val", ["0016E5_000030"])):
        for i, name in enumerate(names):
            save_image(root / split / f"{name}.png", 9, 12, seed=i)
            save_label(root / f"{split}annot" / f"{name}.png", label_with([0, 5, 10, 11], 9, 12))
    (root / "train.txt").write_text("".join(f"/SegNet/CamVid/train/{n}.png /SegNet/CamVid/trainannot/{n}.png\n"
                                            for n in ["0001TP_000010", "0001TP_000020"]))
    (root / "val.txt").write_text("val/0016E5_000030.png valannot/0016E5_000030.png\n")


class TestCamVid:
    def test_fixture(self, tmp_path):
        make_camvid(tmp_path)
        m = build_manifest("camvid", tmp_path)
        assert len(m.class_names) == 11 and m.class_names[0] == "Sky" and m.class_names[-1] == "Bicyclist"
        assert [(r.split, r.id) for r in m.records] == [("train", "0001TP_000010"), ("train", "0001TP_000020"),
                                                       ("val", "0016E5_000030")]
        r = m.records[0]
        assert r.image == "train/0001TP_000010.png" and (r.height, r.width) == (9, 12)   # relative to root
        assert m.resolve(r.image) == tmp_path / "train" / "0001TP_000010.png"
        lbl = load_label(m.resolve(r.label), "camvid", 11, (9, 12))
        assert set(np.unique(lbl)) == {0, 5, 10, 255}  # 11 = void -> ignore

    def test_without_list_files(self, tmp_path):
        make_camvid(tmp_path)
        (tmp_path / "train.txt").unlink()
        m = build_manifest("camvid", tmp_path, splits=["train"])
        assert [r.id for r in m.records] == ["0001TP_000010", "0001TP_000020"]

    def test_missing_folders_listed_exactly(self, tmp_path):
        make_camvid(tmp_path)
        for f in (tmp_path / "valannot").iterdir():
            f.unlink()
        (tmp_path / "valannot").rmdir()
        with pytest.raises(InputError) as exc:
            build_manifest("camvid", tmp_path)
        assert problem(exc).startswith(str(tmp_path))
        assert "missing valannot/ (looked in" in problem(exc)

    def test_listed_file_missing(self, tmp_path):
        make_camvid(tmp_path)
        (tmp_path / "trainannot" / "0001TP_000020.png").unlink()
        with pytest.raises(InputError, match="train.txt: 1 listed label file.*trainannot/0001TP_000020.png"):
            build_manifest("camvid", tmp_path)

    def test_label_size_mismatch_found_at_prepare(self, tmp_path):
        make_camvid(tmp_path)
        save_label(tmp_path / "valannot" / "0016E5_000030.png", np.zeros((8, 12), np.uint8))
        with pytest.raises(InputError, match="label is 8x12.*is 9x12"):
            build_manifest("camvid", tmp_path)

    @pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason=f"real CamVid not present at {CAMVID_ROOT}")
    def test_real_camvid(self):
        m = build_manifest("camvid", CAMVID_ROOT)
        assert len(m.split("train")) == 367 and len(m.split("val")) == 101
        assert all((r.height, r.width) == (360, 480) for r in m.records)
        r = m.split("val")[0]
        lbl = load_label(m.resolve(r.label), "camvid", 11, (r.height, r.width))
        assert lbl.shape == (360, 480) and set(np.unique(lbl).tolist()) <= set(range(11)) | {255}
        assert load_image(m.resolve(r.image)).shape == (360, 480, 3)


# ----------------------------------------------------------------------------- folder
class TestFolder:
    def test_images_labels_classes(self, tmp_path):
        for i, stem in enumerate(["b", "a", "c"]):
            save_image(tmp_path / "images" / f"{stem}.jpg", 10, 14, seed=i)
        save_label(tmp_path / "labels" / "a.png", label_with([0, 2], 10, 14))
        save_label(tmp_path / "labels" / "b.png", label_with([1, 255], 10, 14))
        (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
        m = build_manifest("folder", tmp_path)
        assert m.class_names == ["cat", "dog", "bird"]
        assert [(r.id, r.split) for r in m.records] == [("a", "train"), ("b", "train"), ("c", "train")]
        assert m.records[2].label is None and m.records[0].label.endswith("labels/a.png")
        assert set(np.unique(load_label(m.resolve(m.records[0].label), "folder", 3, (10, 14)))) == {0, 2}

    def test_plain_folder_split_lists_and_inferred_classes(self, tmp_path):
        for i, stem in enumerate(["x1", "x2", "x3"]):
            save_image(tmp_path / f"{stem}.png", 8, 8, seed=i)
            save_label(tmp_path / "labels" / f"{stem}.png", label_with([0, i + 1], 8, 8))
        (tmp_path / "tr.txt").write_text("x1\nx2.png\n")
        (tmp_path / "te.txt").write_text("x3\n")
        m = build_manifest("folder", tmp_path, split_lists={"train": "tr.txt", "val": "te.txt"})
        assert [(r.id, r.split) for r in m.records] == [("x1", "train"), ("x2", "train"), ("x3", "val")]
        assert m.class_names == ["class_0", "class_1", "class_2", "class_3"]
        m = build_manifest("folder", tmp_path, split="all", num_classes=5)
        assert m.splits == ["all"] and len(m.class_names) == 5

    def test_empty_folder(self, tmp_path):
        (tmp_path / "notes.txt").write_text("no images here")
        with pytest.raises(InputError) as exc:
            build_manifest("folder", tmp_path)
        assert problem(exc).startswith(str(tmp_path)) and "no images found" in problem(exc)

    def test_bad_options(self, tmp_path):
        save_image(tmp_path / "a.png")
        with pytest.raises(InputError, match="label folder does not exist"):
            build_manifest("folder", tmp_path, labels="gt")
        (tmp_path / "l.txt").write_text("zzz\n")
        with pytest.raises(InputError, match="1 listed id.*zzz"):
            build_manifest("folder", tmp_path, split_lists={"train": "l.txt"})

    def test_unreadable_image_reported_at_prepare(self, tmp_path):
        save_image(tmp_path / "a.png")
        (tmp_path / "b.png").write_bytes(b"garbage")
        with pytest.raises(InputError) as exc:
            build_manifest("folder", tmp_path)
        assert problem(exc).startswith(str(tmp_path / "b.png"))


# ----------------------------------------------------------------------------- COCO-Stuff
COCO_IDS = {"train2017": ["000000000009", "000000000025"], "val2017": ["000000000139", "000000000285"]}


def make_coco(root: Path, annotations: str = "annotations") -> None:
    # raw stuffthingmap values: 0 person, 2 car, 91 banner, 181 wood, 255 unlabeled
    for folder, ids in COCO_IDS.items():
        for i, image_id in enumerate(ids):
            save_image(root / "images" / folder / f"{image_id}.jpg", 8, 10, seed=i)
            save_label(root / annotations / folder / f"{image_id}.png", label_with([0, 2, 91, 181, 255], 8, 10))


class TestCocoStuff:
    @pytest.mark.parametrize("dataset, n_classes, expected", [
        ("cocostuff27", 27, {9, 11, 17, 24, 255}),       # person, vehicle, textile, solid
        ("cocostuff171", 171, {0, 2, 80, 170, 255}),     # banner is the first stuff class
        ("coco80", 81, {0, 1, 3, 255}),                  # stuff -> background 0, things 1..80
    ])
    def test_variants(self, tmp_path, dataset, n_classes, expected):
        make_coco(tmp_path)
        m = build_manifest(dataset, tmp_path)
        assert len(m.class_names) == n_classes
        assert [(r.split, r.id) for r in m.records] == [("train", i) for i in COCO_IDS["train2017"]] + \
                                                      [("val", i) for i in COCO_IDS["val2017"]]
        r = m.records[0]
        assert set(np.unique(load_label(m.resolve(r.label), dataset, n_classes, (8, 10))).tolist()) == expected

    def test_annotated_only_keeps_images_with_instance_annotations(self, tmp_path):
        make_coco(tmp_path)
        train = COCO_IDS["train2017"]
        (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(
            {"images": [{"id": int(i)} for i in train], "annotations": [{"id": 1, "image_id": int(train[0])}]}))
        m = build_manifest("cocostuff27", tmp_path, splits="train", annotated_only=True)
        assert [r.id for r in m.records] == [train[0]]
        assert m.options["annotated_train"] == f"1 of {len(train)}"
        with pytest.raises(InputError, match="instances_val2017.json: COCO instance annotations not found"):
            build_manifest("cocostuff27", tmp_path, splits="val", annotated_only=True)

    def test_class_names(self):
        assert get_reader("cocostuff27").class_names[9] == "person"
        names171 = get_reader("cocostuff171").class_names
        assert names171[0] == "person" and names171[79] == "toothbrush" and names171[80] == "banner"
        assert "street sign" not in names171 and names171[-1] == "wood"
        names80 = get_reader("coco80").class_names
        assert names80[:2] == ["background", "person"] and len(names80) == 81

    def test_unused_id_is_invalid_in_171(self, tmp_path):
        save_label(tmp_path / "l.png", label_with([0, 11]))  # raw 11 = COCO id 12 'street sign', never annotated
        with pytest.raises(InputError, match=r"\[11\]"):
            load_label(tmp_path / "l.png", "cocostuff171", 171)
        save_label(tmp_path / "l2.png", label_with([0, 182]))
        with pytest.raises(InputError, match=r"\[182\]"):
            load_label(tmp_path / "l2.png", "cocostuff27", 27)

    def test_stuffthingmaps_folder_and_curated_lists(self, tmp_path):
        make_coco(tmp_path, annotations="stuffthingmaps_trainval2017")
        (tmp_path / "val_list.txt").write_text("000000000285\n")
        m = build_manifest("cocostuff27", tmp_path, splits="val", curated=True, curated_val_list="val_list.txt")
        assert [r.id for r in m.records] == ["000000000285"]
        assert m.options["curated_val_list"] == str(tmp_path / "val_list.txt")
        with pytest.raises(InputError, match="49628 train image"):   # the committed list; the fixture has 1
            build_manifest("cocostuff27", tmp_path, curated=True)
        # STEGO layout: curated/<split>2017/Coco164kFull_Stuff_Coarse_7.txt beside the images
        (tmp_path / "curated" / "train2017").mkdir(parents=True)
        (tmp_path / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000025\n")
        m = build_manifest("cocostuff27", tmp_path, splits="train", curated=True)
        assert [r.id for r in m.records] == ["000000000025"]

    def test_committed_curated_lists(self, tmp_path):
        ids = readers_mod.read_list(readers_mod.COCO_CURATED_VAL)
        assert len(ids) == 2175 == len(set(ids)) and ids == sorted(ids)
        assert ids[0] == "000000000139" and ids[-1] == "000000581615"
        train = readers_mod.read_list(readers_mod.COCO_CURATED_TRAIN)
        assert len(train) == 49629 == len(set(train)) and train == sorted(train) and not set(train) & set(ids)
        assert train[0] == "000000000025"
        make_coco(tmp_path)
        with pytest.raises(InputError, match="2174 val image"):  # only 000000000139 exists in the fixture
            build_manifest("cocostuff27", tmp_path, splits="val", curated=True)

    def test_missing_layout(self, tmp_path):
        (tmp_path / "images" / "train2017").mkdir(parents=True)
        with pytest.raises(InputError) as exc:
            build_manifest("cocostuff27", tmp_path)
        assert "missing images/val2017/" in problem(exc) and "images/train2017" not in problem(exc)
        (tmp_path / "images" / "val2017").mkdir()
        with pytest.raises(InputError) as exc:
            build_manifest("cocostuff27", tmp_path)
        assert "annotations/train2017/, stuffthingmaps_trainval2017/train2017/" in problem(exc)


# ----------------------------------------------------------------------------- Cityscapes
def make_cityscapes(root: Path) -> None:
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for k in range(2):
            base = f"{city}_000000_00001{k}"
            save_image(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", 8, 16, seed=k)
            save_label(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png",
                       label_with([0, 6, 7, 26, 33], 8, 16))
            save_label(root / "gtFine" / split / city / f"{base}_gtFine_instanceIds.png", np.zeros((8, 16)))


class TestCityscapes:
    def test_fixture(self, tmp_path):
        make_cityscapes(tmp_path)
        m = build_manifest("cityscapes27", tmp_path)
        assert len(m.class_names) == 27 and m.class_names[0] == "road" and m.class_names[-1] == "bicycle"
        assert [r.id for r in m.split("val")] == ["frankfurt_000000_000010", "frankfurt_000000_000011"]
        r = m.records[0]
        assert r.label.endswith("gtFine/train/aachen/aachen_000000_000010_gtFine_labelIds.png")
        lbl = load_label(m.resolve(r.label), "cityscapes27", 27, (8, 16))
        assert set(np.unique(lbl)) == {0, 19, 26, 255}  # 0..6 void, 7 road, 26 car, 33 bicycle

    def test_missing_gt(self, tmp_path):
        make_cityscapes(tmp_path)
        for p in (tmp_path / "gtFine" / "val" / "frankfurt").iterdir():
            p.unlink()
        with pytest.raises(InputError, match="2 val \\*_gtFine_labelIds.png file"):
            build_manifest("cityscapes27", tmp_path)
        with pytest.raises(InputError, match="missing leftImg8bit/test/, gtFine/test/"):
            build_manifest("cityscapes27", tmp_path, splits=["test"])


# ----------------------------------------------------------------------------- VOC
def make_voc(root: Path) -> None:
    base = root / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    for split, names in ids.items():
        for i, name in enumerate(names):
            save_image(base / "JPEGImages" / f"{name}.jpg", 10, 12, seed=i)
            save_label(base / "SegmentationClass" / f"{name}.png", label_with([0, 15, 20, 255], 10, 12),
                       palette=voc_colormap())
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    (root / "ImageSets").mkdir(exist_ok=True)  # decoy: root itself is not the VOC2012 folder


class TestVoc:
    def test_fixture_palette_labels(self, tmp_path):
        make_voc(tmp_path)
        m = build_manifest("voc21", tmp_path)
        assert len(m.class_names) == 21 and m.class_names[15] == "person"
        assert [len(m.split(s)) for s in ("train", "val")] == [2, 1]
        r = m.split("val")[0]
        assert Image.open(m.resolve(r.label)).mode == "P"
        assert set(np.unique(load_label(m.resolve(r.label), "voc21", 21, (10, 12)))) == {0, 15, 20, 255}

    def test_colour_coded_labels(self, tmp_path):
        idx = label_with([0, 1, 15, 255])
        Image.fromarray(voc_colormap()[idx]).save(tmp_path / "c.png")
        np.testing.assert_array_equal(load_label(tmp_path / "c.png", "voc21", 21), idx)
        Image.fromarray(np.full((4, 4, 3), (1, 2, 3), np.uint8)).save(tmp_path / "bad.png")
        with pytest.raises(InputError, match=r"colour map: \(1,2,3\)"):
            load_label(tmp_path / "bad.png", "voc21", 21)

    def test_missing_parts(self, tmp_path):
        make_voc(tmp_path)
        voc = tmp_path / "VOCdevkit" / "VOC2012"
        (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
        with pytest.raises(InputError) as exc:
            build_manifest("voc21", tmp_path)
        assert problem(exc).startswith(str(voc)) and "missing ImageSets/Segmentation/val.txt" in problem(exc)


# ----------------------------------------------------------------------------- LIP
def make_lip(root: Path, official: bool = True) -> None:
    for split in ("train", "val"):
        img_dir = root / "TrainVal_images" / f"{split}_images" if official else root / f"{split}_images"
        lbl_dir = (root / "TrainVal_parsing_annotations" / f"{split}_segmentations" if official
                   else root / f"{split}_segmentations")
        names = [f"{k}_{split}" for k in (100, 200)]
        for i, name in enumerate(names):
            save_image(img_dir / f"{name}.jpg", 16, 8, seed=i)
            save_label(lbl_dir / f"{name}.png", label_with([0, 2, 5, 9, 13, 15, 19], 16, 8))
        if official:
            (root / "TrainVal_images" / f"{split}_id.txt").write_text("".join(n + "\n" for n in names))


class TestLip:
    @pytest.mark.parametrize("dataset, n_classes, expected", [
        ("lip19", 20, {0, 2, 5, 9, 13, 15, 19}),
        ("lip16", 17, {0, 2, 5, 9, 13, 14, 16}),   # right-arm -> arms, right-shoe -> shoes
        ("lip5", 6, {0, 1, 2, 3, 4, 5}),           # hair/face -> head, upper-clothes -> clothes, ...
    ])
    def test_groupings(self, tmp_path, dataset, n_classes, expected):
        make_lip(tmp_path)
        m = build_manifest(dataset, tmp_path)
        assert len(m.class_names) == n_classes and m.class_names[0] == "background"
        assert [r.id for r in m.split("val")] == ["100_val", "200_val"]
        r = m.records[0]
        assert (r.height, r.width) == (16, 8)
        assert set(np.unique(load_label(m.resolve(r.label), dataset, n_classes, (16, 8))).tolist()) == expected

    def test_flat_layout_without_id_lists(self, tmp_path):
        make_lip(tmp_path, official=False)
        m = build_manifest("lip16", tmp_path, splits="train")
        assert [r.id for r in m.records] == ["100_train", "200_train"]

    def test_missing_labels_says_where_it_looked(self, tmp_path):
        save_image(tmp_path / "TrainVal_images" / "train_images" / "1.jpg")
        with pytest.raises(InputError) as exc:
            build_manifest("lip5", tmp_path, splits="train")
        assert "LIP train label folder not found" in problem(exc)
        assert "TrainVal_parsing_annotations/train_segmentations/" in problem(exc)


def test_manifest_does_not_change_when_the_project_moves(tmp_path, monkeypatch):
    """Paths relative to the data root as given: a moved or re-cloned project reruns nothing."""
    manifests = []
    for place in ("here", "moved"):
        generate_synthetic(tmp_path / place / "data", n_train=2, n_val=1, size=(32, 32))
        monkeypatch.chdir(tmp_path / place)
        manifests.append(build_manifest("synthetic", "data"))
    assert manifests[0].to_dict() == manifests[1].to_dict()
    record = manifests[1].records[0]
    assert record.image == "images/train_00000.png" and manifests[1].root == "data"
    assert load_image(manifests[1].resolve(record.image)).shape == (32, 32, 3)
    # read from elsewhere: the relative root is the project's, given as project_dir
    monkeypatch.chdir(tmp_path)
    manifests[1].save(tmp_path / "moved" / "cache" / "manifest.json")
    loaded = Manifest.load(tmp_path / "moved" / "cache" / "manifest.json", project_dir=tmp_path / "moved")
    assert loaded.resolve(record.image) == tmp_path / "moved" / "data" / "images" / "train_00000.png"
