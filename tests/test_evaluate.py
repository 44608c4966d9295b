"""Evaluation protocols, score -> prediction geometry, bottom-up baseline, dense CRF."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate import (PROTOCOLS, BottomUp, dense_crf, label_in_protocol,
                               score_to_prediction)
from pipeline.store import create_feature_store


def test_protocols_registered():
    assert {"reference", "native", "stego"} <= set(PROTOCOLS.names())
    with pytest.raises(ValueError, match="unknown evaluation protocol 'x'"):
        PROTOCOLS.get("x")


@pytest.mark.parametrize("name, expected", [("reference", (32, 48)), ("native", (60, 90)), ("stego", (320, 320))])
def test_label_geometry_per_protocol(name, expected):
    label = np.zeros((60, 90), dtype=np.uint8)
    assert label_in_protocol(label, (32, 48), PROTOCOLS.get(name)).shape == expected


def test_stego_crops_the_centre_after_shortest_side_320():
    label = np.zeros((100, 200), dtype=np.uint8)
    label[:, :50] = 1                      # left quarter: cut away by the centre crop
    label[:, 50:150] = 2
    out = label_in_protocol(label, (32, 32), PROTOCOLS.get("stego"))
    assert out.shape == (320, 320) and set(np.unique(out)) == {2}


def test_scores_upsampled_to_the_protocol_size():
    scores = torch.zeros(2, 2, 3)
    scores[1, :, 2] = 1.0                  # right column -> cluster 1
    pred = score_to_prediction(scores, (20, 30), (8, 12), PROTOCOLS.get("reference"))
    assert pred.shape == (8, 12)
    assert (pred[:, :6] == 0).all() and (pred[:, -2:] == 1).all()
    assert score_to_prediction(scores, (20, 30), (8, 12), PROTOCOLS.get("native")).shape == (20, 30)


def test_bottom_up_recovers_two_feature_clusters(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    patch = np.empty((4, 4, 6, 8), dtype=np.float32)
    truth = np.zeros((4, 4, 6), dtype=int)
    truth[:, :, 3:] = 1
    patch[truth == 0], patch[truth == 1] = a, b
    patch += rng.normal(scale=0.01, size=patch.shape).astype(np.float32)
    root = create_feature_store(tmp_path / "f.zarr", n_images=4, grid=(4, 6), dim=8, windows_per_image=1,
                                samples_per_image=24, attrs={})
    root["patch"][:] = patch.astype(np.float16)
    root["patch_sample"][:] = patch.reshape(4 * 24, 8).astype(np.float16)    # every patch vector
    model = BottomUp(root, np.arange(3), k=2, seed=0)
    pred = model.scores(root["patch"][3]).argmax(0).numpy()
    assert len(np.unique(pred[:, :3])) == 1 and len(np.unique(pred[:, 3:])) == 1
    assert pred[0, 0] != pred[0, 5]


def test_dense_crf_snaps_a_blurry_boundary_to_the_image_edge():
    pytest.importorskip("pydensecrf", reason="pydensecrf2 not installed (pip install -e '.[crf]')")
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:, 20:] = 255                    # a sharp edge at column 20
    ramp = np.clip((np.arange(40) - 15) / 16, 0.05, 0.95)   # blurry, and centred at column 23
    probs = np.stack([1 - ramp, ramp])[:, None, :].repeat(40, axis=1).astype(np.float32)
    assert (probs.argmax(0)[:, 20:23] == 0).all()           # without the CRF the boundary is off
    refined = dense_crf(image, probs).argmax(0)
    assert (refined[:, :20] == 0).all() and (refined[:, 20:] == 1).all()


def test_model_scores_run_each_batch_once_and_hold_one():
    from pipeline.evaluate import ModelScores

    calls = []

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x[:, :2] * 2

    def images_of(batch):
        calls.append(list(batch))
        return torch.stack([torch.full((3, 2, 2), float(i)) for i in batch])

    scores = ModelScores(Doubler(), images_of, [5, 7, 9, 11, 13], batch_size=2, device=torch.device("cpu"))
    assert scores.num_clusters == 2
    values = [float(scores(i)[0, 0, 0]) for i in [5, 7, 9, 11, 13]]
    assert values == [10.0, 14.0, 18.0, 22.0, 26.0]
    assert calls == [[5, 7], [9, 11], [13]]           # each batch once, num_clusters included
    assert len(scores._cache) == 1


# ----------------------------------------------------------------------------- stego: what the model is fed
SIZES = [(97, 151), (360, 480), (480, 360), (427, 640), (321, 999), (320, 320), (200, 200)]


@pytest.mark.parametrize("size", SIZES)
def test_stego_input_and_label_are_stegos_transform(size):
    """STEGO src/utils.py get_transform(320, is_label, "center"): T.Resize(320, NEAREST), T.CenterCrop(320)."""
    pytest.importorskip("torchvision")
    from PIL import Image
    from torchvision import transforms as T

    from pipeline.evaluate import stego_image

    stego = T.Compose([T.Resize(320, T.InterpolationMode.NEAREST), T.CenterCrop(320)])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    label = rng.integers(0, 5, size=size, dtype=np.uint8)
    np.testing.assert_array_equal(stego_image(image), np.asarray(stego(Image.fromarray(image))))
    np.testing.assert_array_equal(label_in_protocol(label, (32, 48), PROTOCOLS.get("stego")),
                                  np.asarray(stego(Image.fromarray(label))))


def _pixel_dataset(tmp_path, sizes):
    """A manifest of images whose red channel is 255 x their label (random per pixel), so a
    model reading the label off its input is exact only when input and label share a geometry."""
    from PIL import Image

    from pipeline.data import ImageRecord, Manifest

    rng = np.random.default_rng(1)
    records = []
    for n, (h, w) in enumerate(sizes):
        label = rng.integers(0, 2, size=(h, w), dtype=np.uint8)
        image = np.stack([label * 255, rng.integers(0, 256, size=(h, w)), np.zeros_like(label)], -1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"{n}.png")
        Image.fromarray(label).save(tmp_path / f"{n}_label.png")
        records.append(ImageRecord(str(n), "val", f"{n}.png", f"{n}_label.png", h, w))
    return Manifest("synthetic", ["off", "on"], records=records, root=str(tmp_path))


class RecordingModel(torch.nn.Module):
    """A stub model that records every input it gets; `logits(x)` says what it returns."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.logits(x)


class RedReader(RecordingModel):
    """Per-pixel logits (off, on) from the red channel."""

    def logits(self, x):
        return torch.cat([1 - x[:, :1], x[:, :1]], dim=1)


def test_stego_feeds_the_model_the_shortest_side_320_centre_crop(tmp_path):
    from PIL import Image

    from pipeline.data import images_to_tensor
    from pipeline.evaluate import ModelScores, evaluate_rows, model_images

    sizes = [(97, 151), (120, 90), (97, 98)]
    manifest = _pixel_dataset(tmp_path, sizes)
    stego = PROTOCOLS.get("stego")
    model = RedReader()
    train = (32, 48)
    scores = ModelScores(model, model_images(manifest, stego, train), [0, 1, 2], batch_size=1,
                         device=torch.device("cpu"), at_input=True)
    rows = evaluate_rows(manifest, [0, 1, 2], {"model": scores, "pseudo_labels": lambda i: torch.rand(2, 4, 6)},
                         {"model": 2, "pseudo_labels": 2}, train_size=train, protocol="stego", show_progress=False)
    # what the model got, computed here by hand: 97x151 -> 320x498 (int(320 * 151 / 97)), columns
    # round(178 / 2) = 89 ..; 120x90 -> 426x320 (int(320 * 120 / 90)), rows round(106 / 2) = 53 ..;
    # 97x98 -> 320x323, columns round(3 / 2) = 2 .. (torchvision's CenterCrop; not 3 // 2 = 1)
    boxes = [((320, 498), (0, 89)), ((426, 320), (53, 0)), ((320, 323), (0, 2))]
    assert len(model.inputs) == 3
    for i, ((h, w), (y0, x0)) in enumerate(boxes):
        resized = np.asarray(Image.fromarray(manifest.image(i)).resize((w, h), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(model.inputs[i].numpy(), images_to_tensor(resized[y0:y0 + 320, x0:x0 + 320]).numpy())
    assert rows["model"]["pixel_accuracy"] == 100.0 and rows["model"]["miou"] == 100.0
    assert rows["model"]["num_pixels"] == rows["pseudo_labels"]["num_pixels"] == 3 * 320 * 320
    assert rows["model"]["protocol"] == rows["pseudo_labels"]["protocol"] == "stego"


def test_reference_and_native_still_feed_the_training_size_image(tmp_path):
    from pipeline.evaluate import model_images

    manifest = _pixel_dataset(tmp_path, [(97, 151)])
    for name in ("reference", "native"):
        protocol = PROTOCOLS.get(name)
        assert protocol.model_input is None
        np.testing.assert_array_equal(model_images(manifest, protocol, (32, 48))([0]).numpy(),
                                      manifest.batch([0], (32, 48)).numpy())
    with pytest.raises(ValueError, match="no model input"):
        score_to_prediction(torch.zeros(2, 4, 6), (97, 151), (32, 48), PROTOCOLS.get("reference"), at_input=True)


def test_flip_averages_the_logits_of_the_flipped_image_flipped_back():
    from pipeline.evaluate import ModelScores

    class Asymmetric(RecordingModel):
        """Logits that are not flip-equivariant: the input plus a ramp along the width."""

        def logits(self, x):
            return x[:, :2] + torch.arange(x.shape[-1], dtype=x.dtype) ** 2

    images = torch.rand(2, 3, 4, 5)
    model = Asymmetric()
    plain = ModelScores(model, lambda batch: images[batch], [0, 1], batch_size=2, device=torch.device("cpu"))
    flipped = ModelScores(model, lambda batch: images[batch], [0, 1], batch_size=2, device=torch.device("cpu"),
                          flip=True)
    ramp = torch.arange(5, dtype=torch.float32) ** 2
    expected = images[:, :2] + (ramp + ramp.flip(0)) / 2       # (m(x) + flip(m(flip(x)))) / 2
    for i in (0, 1):
        torch.testing.assert_close(plain(i), images[i, :2] + ramp)
        torch.testing.assert_close(flipped(i), expected[i])
    torch.testing.assert_close(model.inputs[-1], images.flip(dims=[3]))   # the flipped image was fed
    assert len(model.inputs) == 3                                          # plain once, flipped twice
