"""`pipeline.artifacts`, `transfgu inspect` and the HTML report, on small artifacts made in place.

The cache is built directly with the store / concepts / train / evaluate functions on
a 10-image synthetic set with the random tiny ViT, so these tests do not depend on
running the pipeline (and take seconds).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.artifacts import open_artifacts
from pipeline.inspection import inspect_group, pca_rgb, upsample_nearest
from pipeline.report import ReportOptions, build_report

K, WINDOWS, SIZE = 4, 5, (64, 64)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fill_features(cache: Path, manifest, backbone) -> None:
    from pipeline.data import load_image, resize_image
    from pipeline.features import sliding_windows
    from pipeline.store import create_feature_store, image_members

    train = [i for i, r in enumerate(manifest.records) if r.split == "train"]
    grid = (SIZE[0] // backbone.patch_size, SIZE[1] // backbone.patch_size)
    boxes = sliding_windows(*SIZE, [0.5, 0.75], 0.5)[:WINDOWS]
    attrs = {"backbone": backbone.name, "weights_id": backbone.weights_id, "weights_source": "",
             "image_size": list(SIZE), "grid": list(grid), "concept_size": list(SIZE),
             "windows": boxes.tolist(), "crop_split": "train", "eval_split": "val"}
    members = image_members([r.split for r in manifest.records], "val", "train")
    root = create_feature_store(cache / "features.zarr", n_images=len(manifest.records), grid=grid,
                                dim=backbone.embed_dim, windows_per_image=WINDOWS, members=members, attrs=attrs)
    images = torch.from_numpy(np.stack([resize_image(load_image(manifest.resolve(r.image)), SIZE)
                                        for r in manifest.records])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = backbone(images)
    patch = out.patch.numpy().astype(np.float16)
    for i in members["eval"]:
        root["patch"][i] = patch[i]
    root["embedding"][:] = out.embedding.numpy()
    root["saliency"][:] = out.saliency.numpy().astype(np.float16)
    rng = np.random.default_rng(0)
    for i in train:
        root["patch_sample"][i] = patch[i, 0, 0]
        rows = slice(i * WINDOWS, (i + 1) * WINDOWS)
        root["crops/embedding"][rows] = rng.normal(size=(WINDOWS, backbone.embed_dim)).astype(np.float16)
        root["crops/kind"][rows] = np.array([1, 2, 1, 2, 0], dtype=np.uint8)


def _fill_concepts(cache: Path) -> None:
    import zarr

    from pipeline.concepts import Concepts

    store = zarr.open_group(str(cache / "features.zarr"), mode="r")
    emb, kind = store["crops/embedding"][:], store["crops/kind"][:]
    pools = ["thing", "thing", "stuff", "stuff"]
    centroids = np.stack([emb[kind == (1 + c // 2)][c % 2::2].mean(0) for c in range(K)]).astype(np.float32)
    assignment = np.full(len(emb), -1, dtype=np.int32)
    for pool, offset in ((1, 0), (2, 2)):
        rows = np.flatnonzero(kind == pool)
        d = ((emb[rows, None] - centroids[None, offset:offset + 2]) ** 2).sum(-1)
        assignment[rows] = d.argmin(1) + offset
    sizes = np.bincount(assignment[assignment >= 0], minlength=K)
    Concepts(centroids, pools, sizes, assignment, {"thing": 1.0}, False).save(cache / "concepts", {})


def _fill_pseudolabels(cache: Path, manifest, grid: tuple[int, int]) -> None:
    import h5py

    from pipeline.store import create_pseudolabel_file

    attrs = {"num_concepts": K, "grid": list(grid), "image_size": list(SIZE),
             "concept_pools": ["thing", "thing", "stuff", "stuff"]}
    path = cache / "pseudolabels.h5"
    create_pseudolabel_file(path, image_ids=[r.id for r in manifest.records], num_concepts=K, grid=grid, attrs=attrs)
    rng = np.random.default_rng(1)
    cam = rng.random((len(manifest.records), K, *grid)).astype(np.float16)
    with h5py.File(path, "r+") as handle:
        handle["cam"][:] = cam
        handle["label"][:] = cam.argmax(1).astype(np.uint8)
        handle["done"][:] = True


def _train_and_evaluate(cache: Path, manifest, backbone) -> None:
    from pipeline.evaluate import ModelScores, cam_scores, evaluate_rows, plot_confusion
    from pipeline.config import TrainConfig
    from pipeline.files import write_json
    from pipeline.store import CamReader, open_pseudolabels
    from pipeline.train.data import PseudoLabelDataset
    from pipeline.train.inference import load_segmenter
    from pipeline.train.loop import train_segmenter

    train = [i for i, r in enumerate(manifest.records) if r.split == "train"]
    val = [i for i, r in enumerate(manifest.records) if r.split == "val"]
    dataset = PseudoLabelDataset(lambda p: manifest.image(train[p], SIZE), CamReader(cache / "pseudolabels.h5", train),
                                 len(train))
    config = TrainConfig(epochs=2, batch_size=3, num_workers=0, device="cpu", bootstrap_start=1, teacher_interval=1)
    train_segmenter(backbone, dataset, K, config, cache / "model", progress=False, log_fn=lambda _: None)
    model = load_segmenter(backbone, cache / "model" / "model.pt")
    scores = ModelScores(model, lambda b: manifest.batch(b, SIZE), val, 4, torch.device("cpu"))
    with open_pseudolabels(cache / "pseudolabels.h5") as handle:
        rows = evaluate_rows(manifest, val, {"model": scores, "pseudo_labels": lambda i: cam_scores(handle, i)},
                             {"model": K, "pseudo_labels": K}, train_size=SIZE, protocol="reference",
                             show_progress=False)
    metrics = {name: {key: row[key] for key in ("miou", "pixel_accuracy", "per_class_iou", "num_clusters", "protocol")}
               for name, row in rows.items()}
    metrics["evaluation"] = {"protocol": "reference", "split": "val", "images": len(val)}
    for name, row in rows.items():
        plot_confusion(row, manifest.class_names, cache / "plots" / f"confusion_{name}.png", name)
    write_json(cache / "plots" / "matching.json", {name: row["matching"] for name, row in rows.items()})
    write_json(cache / "metrics.json", metrics)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A complete cache/ (manifest, features, concepts, pseudo labels, model, metrics, plots)."""
    from pipeline.backbones import create_backbone
    from pipeline.data import build_manifest, generate_synthetic

    base = tmp_path_factory.mktemp("artifacts")
    generate_synthetic(base / "data", n_train=6, n_val=4, size=SIZE, seed=0)
    cache = base / "cache"
    manifest = build_manifest("synthetic", base / "data")
    manifest.save(cache / "manifest.json")
    backbone = create_backbone("vit_tiny_random")
    _fill_features(cache, manifest, backbone)
    _fill_concepts(cache)
    grid = (SIZE[0] // backbone.patch_size, SIZE[1] // backbone.patch_size)
    _fill_pseudolabels(cache, manifest, grid)
    _train_and_evaluate(cache, manifest, backbone)
    return cache


@pytest.fixture()
def partial_cache(cache, tmp_path) -> Path:
    """Only manifest, features and concepts: the later stages have not run."""
    dest = tmp_path / "cache"
    dest.mkdir()
    for name in ("manifest.json", "features.zarr", "concepts"):
        src = cache / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dest / name)
    return dest


# ----------------------------------------------------------------------------- Python access
def test_artifacts_open_lazily_and_agree_with_the_files(cache):
    import h5py

    with open_artifacts(cache) as art:
        n = len(art.manifest.records)
        assert art._h5 is None and art._segmenter is None         # nothing opened yet
        patch = art.features["patch"]
        assert patch.shape[:3] == (n, 8, 8) and type(patch).__module__.startswith("dask")
        image_id = art.image_ids[7]
        cam, label = art.pseudolabels(image_id)
        with h5py.File(cache / "pseudolabels.h5") as handle:
            np.testing.assert_array_equal(cam, handle["cam"][7].astype(np.float32))
            np.testing.assert_array_equal(label, handle["label"][7])
        assert np.array_equal(art.pseudolabels(7)[1], label)       # by index too

        members = art.concept_members(2)
        assert len(members) == art.concepts.sizes[2] > 0
        assert (art.concepts.assignment[members.rows] == 2).all()
        assert (np.diff(members.distances) >= 0).all()           # nearest first
        assert members.boxes.shape == (len(members), 4)
        assert set(members.images) <= {i for i, r in enumerate(art.manifest.records) if r.split == "train"}
        assert art.crop(members.images[0], members.boxes[0], 24).shape == (24, 24, 3)

        logits, pred = art.predictions(image_id)
        assert logits.shape == (K, 8, 8) and pred.shape == (8, 8)
        assert set(art.metrics) >= {"model", "pseudo_labels", "evaluation"}
        assert list(art.train_log["epoch"]) == [0, 1]
        assert set(art.matching) == {"model", "pseudo_labels"}


def test_features_as_xarray_with_named_dimensions(cache):
    pytest.importorskip("xarray", reason="xarray is optional (pip install xarray)")
    ds = open_artifacts(cache).features_xarray()
    assert ds["patch"].dims == ("image", "y", "x", "channel")
    assert ds["patch"].sel(image="val_00001").shape == (8, 8, ds.sizes["channel"])
    assert ds["crop_box"].dims == ("crop", "corner")


def test_images_chosen_by_id_index_or_seeded_random(cache):
    from pipeline.errors import InputError

    art = open_artifacts(cache)
    assert art.select(ids=["val_00001"], indices=[0, 0]) == [art.index("val_00001"), 0]
    drawn = art.select(random=3, seed=5, split="val")
    assert drawn == art.select(random=3, seed=5, split="val")
    assert all(art.manifest.records[i].split == "val" for i in drawn) and len(drawn) == 3
    with pytest.raises(InputError, match="no image with id"):
        art.select(ids=["nope"])
    with pytest.raises(InputError, match="out of range"):
        art.select(indices=[99])


def test_pca_rgb_is_deterministic_and_in_range():
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 16)).astype(np.float16)
    a, b = pca_rgb(x), pca_rgb(x.copy())
    assert a.shape == (2, 4, 5, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    ids = np.arange(6).reshape(2, 3)
    assert upsample_nearest(ids, (4, 6)).tolist()[0] == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, expected", [
    (["features", "--index", "0", "--id", "val_00002"], 2),
    (["features", "--random", "3", "--seed", "1", "--split", "train"], 3),
    (["concepts", "--per-concept", "4"], K + 1),
    (["pseudolabels", "--id", "train_00001"], 1),
    (["predictions", "--random", "2"], 2),
    (["predictions", "--index", "1", "--no-model"], 1),
])
def test_inspect_commands_write_the_pngs_they_print(cache, tmp_path, args, expected):
    out = tmp_path / "out"
    result = CliRunner().invoke(inspect_group, [*args, "--cache", str(cache), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    printed = [Path(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(printed) == expected
    for path in printed:
        assert path.parent == out and path.suffix == ".png"
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_inspect_reports_missing_artifacts_as_a_clean_error(partial_cache):
    result = CliRunner().invoke(inspect_group, ["pseudolabels", "--cache", str(partial_cache)])
    assert result.exit_code != 0
    assert "pseudolabels.h5" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- report
def _local_references(index: Path) -> list[str]:
    text = index.read_text()
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', text)


def test_report_has_every_section_and_references_only_existing_files(cache, tmp_path):
    index = build_report(cache, tmp_path / "report", ReportOptions(samples=2, per_concept=4))
    text = index.read_text()
    for section in ("metrics", "per-class-iou", "confusion", "training", "concepts", "samples"):
        assert f'id="{section}"' in text
    assert "Not available" not in text
    for row in ("model", "pseudo_labels"):
        assert f"<td>{row}</td>" in text
    refs = _local_references(index)
    assert len(refs) >= 1 + 2 + 1 + (K + 1) + 2 + 1 + 2
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "/")), ref      # self-contained folder
        assert (index.parent / ref).is_file(), ref
    assert not (tmp_path / "report.partial").exists()


def test_report_of_a_partial_cache_says_what_is_missing(partial_cache):
    index = build_report(partial_cache, options=ReportOptions(samples=1, per_concept=2))
    assert index == partial_cache / "report" / "index.html"
    text = index.read_text()
    assert text.count("Not available") == 4          # metrics, confusion, training, samples
    assert 'id="concepts"' in text
    for ref in _local_references(index):
        assert (index.parent / ref).is_file()


_CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute("src"));
  const mark = document.createElement("div");
  mark.id = "image-check";
  mark.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(mark);
});
</script>"""


def test_report_renders_in_headless_chromium(cache, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    index = build_report(cache, tmp_path / "report", ReportOptions(samples=1, per_concept=4))
    checked = index.with_name("checked.html")
    checked.write_text(index.read_text().replace("</body>", _CHECK_IMAGES + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
            capture_output=True, text=True, timeout=60)
    match = re.search(r'<div id="image-check">(.*?)</div>', result.stdout)
    assert match, f"no image check in the DOM (rc {result.returncode}):\n{result.stderr[-2000:]}"
    report = json.loads(match.group(1).replace("&quot;", '"'))
    assert report["total"] == len(re.findall(r"<img ", index.read_text())) > 5
    assert report["broken"] == []


def test_report_falls_back_to_pseudo_labels_when_the_model_cannot_be_rebuilt(cache, tmp_path, monkeypatch):
    from pipeline.artifacts import Artifacts
    from pipeline.errors import InputError

    def no_model(self, key):
        raise InputError("weights.pth", "backbone weights not found")

    monkeypatch.setattr(Artifacts, "predictions", no_model)
    index = build_report(cache, tmp_path / "report", ReportOptions(samples=1, per_concept=2))
    text = index.read_text()
    assert text.count("Not available") == 1 and "weights.pth: backbone weights not found" in text
    for ref in _local_references(index):
        assert (index.parent / ref).is_file()


def test_predictions_before_evaluate_match_on_the_shown_images(cache, partial_cache):
    from pipeline.inspection import plot_predictions, resolve_matching

    shutil.copyfile(cache / "pseudolabels.h5", partial_cache / "pseudolabels.h5")
    with open_artifacts(partial_cache) as art:
        assert art.matching is None
        labels = {6: art.label(6)}
        maps = {6: {"pseudo_labels": art.pseudolabels(6)[1].repeat(8, 0).repeat(8, 1)}}
        matching, how = resolve_matching(art, maps, labels)
        assert "shown images" in how and matching["pseudo_labels"].shape == (K,)
        assert (matching["pseudo_labels"] < len(art.manifest.class_names)).all()
        paths = plot_predictions(art, [6, 7], partial_cache / "out", show_progress=False)
    assert [p.read_bytes()[:8] for p in paths] == [PNG_MAGIC] * 2


def test_patch_features_are_computed_for_images_the_store_does_not_hold(cache):
    # The store holds the patch features of the evaluation split only; inspection computes the
    # others with the backbone, which gives what the features stage would have stored.
    from pipeline.artifacts import open_artifacts
    from pipeline.backbones import create_backbone
    from pipeline.data import images_to_tensor
    from pipeline.errors import InputError
    from pipeline.store import read_rows

    art = open_artifacts(cache)
    train = art.select(random=1, split="train")[0]
    val = art.select(random=1, split="val")[0]
    with pytest.raises(InputError, match="patch features are stored for the evaluation split only"):
        read_rows(art.feature_store, "patch", train)
    both = art.patch_features([train, val])
    with torch.no_grad():
        expected = create_backbone("vit_tiny_random")(images_to_tensor(art.image(train, SIZE))).patch[0]
    np.testing.assert_allclose(both[0].astype(np.float32), expected.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(both[1], read_rows(art.feature_store, "patch", val))
    art.close()
