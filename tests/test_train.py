"""Training: config, schedule, augmentation alignment, losses, learning, resume."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cam import normalize_cams
from pipeline.config import TrainConfig
from pipeline.model import MaskTransformerDecoder
from pipeline.train.augment import augment_batch, crop_and_resize, photometric_augment, sample_crop_boxes
from pipeline.train.data import PseudoLabelDataset
from pipeline.train.inference import load_segmenter, predict_logits
from pipeline.train.loop import train_segmenter
from pipeline.train.losses import diversity_loss, pseudo_targets, uncertainty_loss
from pipeline.train.schedule import (is_teacher_update_epoch, peer_alpha, teacher_interval_at,
                                     teacher_update_epochs)
from pipeline.train.state import teacher_update

PATCH = 8


def colour_block_data(n: int, size: int = 64, seed: int = 0):
    """Images of 8x8 blocks each dominated by one of R, G, B; CAM = one-hot of the colour."""
    rng = np.random.default_rng(seed)
    g = size // PATCH
    labels = rng.integers(0, 3, size=(n, g, g))
    colours = np.full((n, g, g, 3), 0.15) + rng.uniform(-0.1, 0.1, size=(n, g, g, 3))
    np.put_along_axis(colours, labels[..., None], 0.85, axis=-1)
    images = np.repeat(np.repeat(colours, PATCH, axis=1), PATCH, axis=2)
    images = (np.clip(images, 0, 1) * 255).astype(np.uint8)
    cams = np.eye(3, dtype=np.float32)[labels].transpose(0, 3, 1, 2)  # (n, 3, g, g)
    return images, cams, labels


def make_dataset(images, cams):
    return PseudoLabelDataset(lambda i: images[i], lambda i: cams[i], len(images))


def fast_config(**overrides) -> TrainConfig:
    base = dict(
        epochs=3, lr=1e-3, batch_size=8, num_workers=0, device="cpu", seed=0,
        decoder_heads=6, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
        bootstrap=False, decoder_dropout=0.0,
    )
    base.update(overrides)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- config / schedule


def test_config_defaults_and_parsing():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip_value) == (1e-4, 5e-4, 1.0)
    assert cfg.crop_scale == (0.4, 0.9) and cfg.crop_output_fraction == 0.5
    assert (cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.hflip) == (0.3, 0.2, 0.2, True)
    assert (cfg.uncertainty_weight, cfg.diversity_weight, cfg.teacher_mix) == (0.3, 1.0, 0.5)
    assert (cfg.peer_alpha_start, cfg.peer_alpha_end) == (0.03, 0.10)
    assert TrainConfig(teacher_interval="3,3,3,2").teacher_interval == [3, 3, 3, 2]
    assert TrainConfig(teacher_interval=[4]).teacher_interval == 4
    assert TrainConfig(crop_scale=[0.5, 0.8]).crop_scale == (0.5, 0.8)
    with pytest.raises(ValueError):
        TrainConfig(crop_scale=(0.9, 0.4))


def test_teacher_schedule_matches_reference():
    # COCO-Stuff-171: intervals 3,3,3,2 (one entry per 10 epochs), bootstrapping from 3
    cfg = TrainConfig(epochs=40, teacher_interval=[3, 3, 3, 2], bootstrap_start=3)
    assert teacher_update_epochs(cfg) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32, 34, 36, 38]
    assert teacher_interval_at(29, cfg) == 3 and teacher_interval_at(30, cfg) == 2 and teacher_interval_at(99, cfg) == 2
    # COCO-Stuff-27: 2 / 2
    assert teacher_update_epochs(TrainConfig(epochs=9)) == [2, 4, 6, 8]
    # bootstrapping off: never
    assert teacher_update_epochs(TrainConfig(epochs=9, bootstrap=False)) == []
    # bootstrap_start that is no multiple of the interval still starts with an update
    cfg = TrainConfig(epochs=8, teacher_interval=3, bootstrap_start=2)
    assert teacher_update_epochs(cfg) == [2, 3, 6]
    assert not is_teacher_update_epoch(1, cfg)


def test_peer_alpha_steps_from_003_to_010():
    cfg = TrainConfig()
    assert [peer_alpha(i, cfg) for i in range(10)] == pytest.approx(
        [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.10, 0.10]
    )


def test_teacher_update_copies_student_and_resets_it():
    torch.manual_seed(0)
    student, teacher = MaskTransformerDecoder(12, 3), MaskTransformerDecoder(12, 3)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_update(student, teacher, initial)
    for k in initial:
        assert torch.equal(teacher.state_dict()[k], trained[k])
        assert torch.equal(student.state_dict()[k], initial[k])


# --------------------------------------------------------------------------- augmentation


def _ramp_batch(b: int, size: tuple[int, int]):
    """Linear ramps (bilinear sampling and box averaging are exact on them) and their
    patch-averaged CAMs."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    slopes = torch.rand(b, 3, 2)
    images = (slopes[..., 0, None, None] * yy + slopes[..., 1, None, None] * xx) / (h + w)
    cams = F.avg_pool2d(images, PATCH)  # CAM channel k = image channel k on the patch grid
    return images, cams


def test_crop_keeps_image_and_cam_aligned():
    torch.manual_seed(0)
    images, cams = _ramp_batch(6, (64, 96))
    boxes = sample_crop_boxes(6, (64, 96), (0.4, 0.9), torch.Generator().manual_seed(0))
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
    out, cam_out = crop_and_resize(images, cams, boxes, (32, 48), (4, 6))
    assert out.shape == (6, 3, 32, 48) and cam_out.shape == (6, 3, 4, 6)
    pooled = F.avg_pool2d(out, PATCH)
    # border cells may sample outside the CAM grid's first/last cell centres (clamped)
    assert torch.allclose(pooled[..., 1:-1, 1:-1], cam_out[..., 1:-1, 1:-1], atol=1e-5)
    assert torch.allclose(pooled, cam_out, atol=0.05)


def test_augment_batch_keeps_alignment_through_flip():
    torch.manual_seed(1)
    images, cams = _ramp_batch(16, (64, 64))
    cfg = TrainConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, hflip=True)
    out, cam_out = augment_batch(images, cams, cfg, PATCH, torch.Generator().manual_seed(3))
    assert out.shape == (16, 3, 32, 32) and cam_out.shape == (16, 3, 4, 4)
    pooled = F.avg_pool2d(out, PATCH)
    assert torch.allclose(pooled[..., 1:-1, 1:-1], cam_out[..., 1:-1, 1:-1], atol=1e-5)
    # some samples were flipped: their x-slope changed sign relative to the original
    dx_img = images[:, 0, 0, -1] - images[:, 0, 0, 0]
    dx_out = out[:, 0, 16, -1] - out[:, 0, 16, 0]
    flipped = (dx_img * dx_out) < 0
    assert 0 < int(flipped.sum()) < 16


def test_photometric_augment_ranges():
    x = torch.rand(8, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    same = photometric_augment(x, TrainConfig(jitter_p=0, grayscale_p=0, blur_p=0), g)
    assert torch.equal(same, x)
    y = photometric_augment(x, TrainConfig(jitter_p=1, grayscale_p=0, blur_p=1), g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, x)
    z = photometric_augment(x, TrainConfig(jitter_p=0, grayscale_p=1, blur_p=0), g)
    assert torch.allclose(z[:, 0], z[:, 1]) and torch.allclose(z[:, 1], z[:, 2])


# --------------------------------------------------------------------------- losses


def test_diversity_loss():
    eye = torch.eye(4, 8).unsqueeze(0).repeat(2, 1, 1)
    assert diversity_loss(eye).item() == pytest.approx(1.0)
    same = torch.ones(1, 3, 8)
    assert diversity_loss(same).item() == pytest.approx(2.0)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert diversity_loss(opposite).item() == pytest.approx(0.0)


def test_uncertainty_loss_range():
    logits = torch.randn(4, 5, 6, 6) * 3
    u = uncertainty_loss(logits).item()
    assert 0 <= u <= 1
    assert uncertainty_loss(torch.zeros(1, 5, 2, 2)).item() == pytest.approx(1.0)
    confident = torch.zeros(1, 5, 2, 2)
    confident[:, 2] = 100
    assert uncertainty_loss(confident).item() == pytest.approx(0.0, abs=1e-6)


def test_cam_normalisation_and_targets():
    cams = torch.zeros(1, 2, 1, 2)
    cams[0, 0] = torch.tensor([[2.0, 1.0]])
    cams[0, 1] = torch.tensor([[0.0, 0.5]])
    sample = normalize_cams(cams, "image")  # one min/max over both channels: 0 .. 2
    assert torch.allclose(sample[0, :, 0, 1], torch.tensor([0.5, 0.25]))
    channel = normalize_cams(cams, "concept")  # each channel to 0 .. 1
    assert torch.allclose(channel[0, :, 0, 1], torch.tensor([0.0, 1.0]))
    _, target = pseudo_targets(sample)
    assert target.tolist() == [[[0, 0]]]
    teacher = torch.full((1, 2, 1, 2), -10.0)
    teacher[:, 1] = 10.0  # teacher sure of class 1 everywhere
    _, target = pseudo_targets(sample, teacher, teacher_mix=0.6)
    assert target.tolist() == [[[1, 1]]]


# --------------------------------------------------------------------------- training runs


def test_training_learns_a_trivial_mapping(tmp_path, tiny_backbone):
    images, cams, _ = colour_block_data(96, seed=0)
    cfg = fast_config(epochs=3, batch_size=8)
    lines: list[str] = []
    model_path = train_segmenter(tiny_backbone(), make_dataset(images, cams), 3, cfg, tmp_path, log_fn=lines.append)
    assert model_path == tmp_path / "model.pt" and (tmp_path / "last.pt").exists()
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["ce"]) < float(rows[0]["ce"])
    assert len([l for l in lines if l.startswith("epoch")]) == 3

    test_images, _, test_labels = colour_block_data(16, seed=1)
    model = load_segmenter(tiny_backbone(), model_path)
    x = torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255
    logits = predict_logits(model, x)
    assert logits.shape == (16, 3, 8, 8) and logits.dtype == torch.float32
    accuracy = (logits.argmax(1).numpy() == test_labels).mean()
    assert accuracy > 0.8, accuracy  # chance is 1/3


def test_resume_equals_straight_run_and_schedule(tmp_path, tiny_backbone):
    images, cams, _ = colour_block_data(24, seed=2)
    ds = make_dataset(images, cams)
    # bootstrapping from epoch 1 with a teacher update every epoch; photometric aug on
    cfg = dict(bootstrap=True, bootstrap_start=1, teacher_interval=1, jitter_p=0.5, grayscale_p=0.3,
               blur_p=0.3, decoder_dropout=0.1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log_a: list[str] = []
    train_segmenter(tiny_backbone(), ds, 3, fast_config(epochs=3, **cfg), straight, log_fn=log_a.append)

    train_segmenter(tiny_backbone(), ds, 3, fast_config(epochs=2, **cfg), resumed, log_fn=lambda s: None)
    after_two = torch.load(resumed / "last.pt", weights_only=True)["state"]
    assert after_two["epoch"] == 2
    log_b: list[str] = []
    train_segmenter(tiny_backbone(), ds, 3, fast_config(epochs=3, **cfg), resumed, log_fn=log_b.append)
    assert any(l.startswith("resuming") for l in log_b)

    a = torch.load(straight / "last.pt", weights_only=True)["state"]
    b = torch.load(resumed / "last.pt", weights_only=True)["state"]
    for part in ("student", "teacher", "initial"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # epoch 2 started with teacher <- student (as trained up to epoch 1), student <- initial
    for k in after_two["student"]:
        assert torch.equal(b["teacher"][k], after_two["student"][k])
    assert [l.split(":")[0] for l in log_a if "teacher <- student" in l] == ["epoch 1", "epoch 2"]
    rows = list(csv.DictReader(open(resumed / "train_log.csv")))
    assert [int(r["teacher_update"]) for r in rows] == [0, 1, 1]
    assert [float(r["alpha"]) for r in rows] == pytest.approx([0.0, 0.03, 0.03])
    assert float(rows[1]["peer"]) > 0
    # model.pt = the student (what the reference evaluates)
    m = torch.load(resumed / "model.pt", weights_only=True)
    assert m["which"] == "student"
    for k in m["decoder"]:
        assert torch.equal(m["decoder"][k], b["student"][k])


def test_checkpoint_resumed_only_when_it_reaches_the_clean_result(tmp_path, tiny_backbone):
    images, cams, _ = colour_block_data(8, seed=3)
    ds = make_dataset(images, cams)
    fresh = tmp_path / "fresh"
    train_segmenter(tiny_backbone(), ds, 3, fast_config(epochs=1, lr=5e-4), fresh, log_fn=lambda s: None)

    def run(**overrides) -> list[str]:
        lines: list[str] = []
        train_segmenter(tiny_backbone(), ds, 3, fast_config(**overrides), tmp_path, log_fn=lines.append)
        return lines

    run(epochs=2)
    # another lr: the checkpoint cannot reach that run's result, so training starts over and says why
    lines = run(epochs=1, lr=5e-4)
    assert [l for l in lines if "starting over" in l] == [l for l in lines if "not resuming" in l and "lr:" in l]
    assert len([l for l in lines if "starting over" in l]) == 1
    # fewer epochs than the checkpoint has done: start over too, to exactly the clean 1-epoch run
    run(epochs=2, lr=5e-4)
    lines = run(epochs=1, lr=5e-4)
    assert any("more than epochs=1" in l and "starting over" in l for l in lines), lines
    a = torch.load(fresh / "model.pt", weights_only=True)["decoder"]
    b = torch.load(tmp_path / "model.pt", weights_only=True)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # already finished, only num_workers differs: nothing to train, model.pt rewritten
    (tmp_path / "model.pt").unlink()
    lines = run(epochs=1, lr=5e-4, num_workers=1)
    assert any(l.startswith("resuming") for l in lines) and (tmp_path / "model.pt").exists()
    # a damaged checkpoint is not resumed either
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    lines = run(epochs=1, lr=5e-4)
    assert any("unreadable" in l and "starting over" in l for l in lines), lines


@pytest.mark.parametrize("repeat, drop_last, expected", [(1, True, 2), (1, False, 3), (20, True, 52), (20, False, 53)])
def test_optimiser_steps_per_epoch_follow_repeat_and_drop_last(tmp_path, monkeypatch, tiny_backbone, repeat,
                                                              drop_last, expected):
    """21 images in batches of 8: the reference's drop_last keeps whole batches only; repeat 20
    makes one epoch 20 passes (420 samples: 52 whole batches)."""
    from pipeline.train.loop import steps_per_epoch

    images, cams, _ = colour_block_data(21, seed=4)
    config = fast_config(epochs=1, repeat=repeat, drop_last=drop_last)
    assert steps_per_epoch(21, config) == expected
    steps = []
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    train_segmenter(tiny_backbone(), make_dataset(images, cams), 3, config, tmp_path, log_fn=lambda s: None)
    assert len(steps) == expected


def test_object_centric_scores_recompute_the_background_on_the_crop():
    """Hand-computed: two concept CAMs of one crop and a stale full-image background channel."""
    from pipeline.train.losses import crop_cam_scores

    cams = torch.tensor([[[[4.0, 2.0, 2.0]],        # concept 0
                          [[2.0, 3.0, 2.05]],       # concept 1
                          [[9.0, 9.0, 9.0]]]])      # stored background: ignored
    scores, foreground = crop_cam_scores(cams, "image", background_threshold=0.1)
    # one min/max over the crop's two concept maps: min 2, max 4
    expected_concepts = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.5, 0.025]]])
    torch.testing.assert_close(scores[0, :2], expected_concepts)
    # background = relu(0.1 - max over concepts) per pixel, not normalised again
    torch.testing.assert_close(scores[0, 2], torch.tensor([[0.0, 0.0, 0.075]]))
    assert foreground.tolist() == [[[True, True, False]]]
    assert scores[0].argmax(0).tolist() == [[0, 1, 2]]         # the third pixel is background
    plain, none = crop_cam_scores(cams[:, :2], "image")       # thing-stuff: all channels together
    assert none is None
    torch.testing.assert_close(plain, expected_concepts[None])


def test_uncertainty_of_the_foreground_only():
    from pipeline.train.losses import uncertainty_loss

    logits = torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]], [[9.0, 9.0]]]])   # 3 channels, 2 pixels
    where = torch.tensor([[[False, True]]])
    p = torch.tensor([5.0, 0.0]).softmax(0)
    expected = 1 - (p[0] - p[1])                      # pixel 2 of the two concept logits only
    torch.testing.assert_close(uncertainty_loss(logits[:, :2], where), expected)
    assert uncertainty_loss(logits[:, :2], torch.zeros_like(where)).item() == 0.0
    torch.testing.assert_close(uncertainty_loss(logits[:, :2]), (1 + expected) / 2)   # pixel 1: a tie


def test_training_images_at_another_size_than_the_cams(tmp_path, tiny_backbone):
    """train.image_size (LIP-5/16: 480x240 images on 640x320 CAMs): the CAMs are cropped onto each
    crop's patch grid whatever their own resolution; the model still learns the mapping."""
    images, cams, labels = colour_block_data(64, seed=5)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)          # 128x128 images, CAMs still 8x8
    model_path = train_segmenter(tiny_backbone(), make_dataset(big, cams), 3, fast_config(epochs=3), tmp_path,
                                 log_fn=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert float(rows[-1]["ce"]) < float(rows[0]["ce"])
    model = load_segmenter(tiny_backbone(), model_path)
    logits = predict_logits(model, torch.from_numpy(big[:8]).permute(0, 3, 1, 2).float() / 255)
    predicted = logits.argmax(1)[:, ::2, ::2].numpy()                   # 16x16 grid back onto the 8x8 labels
    assert (predicted == labels[:8]).mean() > 0.6, (predicted == labels[:8]).mean()


def test_discrete_crop_scales_as_the_reference():
    """segmenter_*.py: scale = randint(4, 10) / 10, window size and corner truncated to pixels."""
    boxes = sample_crop_boxes(400, (64, 96), (0.4, 0.9), torch.Generator().manual_seed(0), step=0.1)
    heights = (boxes[:, 3] - boxes[:, 1]).numpy()
    assert set(np.round(heights).astype(int)) == {int(64 * s / 10) for s in range(4, 10)}   # 25, 32, ..., 57
    assert torch.equal(boxes, boxes.floor())                                               # whole pixels
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()


# --------------------------------------------------------------------------- input pipeline


def test_batched_hue_is_torchvisions_per_sample():
    from torchvision.transforms.v2 import functional as TF

    from pipeline.train.augment import adjust_hue

    x = torch.rand(5, 3, 12, 10)
    x[0] = 0.5                                               # grey: no hue, no NaN
    hue = torch.tensor([0.1, -0.2, 0.5, -0.5, 0.0])
    expected = torch.stack([TF.adjust_hue(xi, float(h)) for xi, h in zip(x, hue)])
    torch.testing.assert_close(adjust_hue(x, hue), expected, rtol=0, atol=1e-6)


def test_a_rank_augments_its_part_as_one_process_augments_the_whole_batch():
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)     # as the loader delivers them
    cams = torch.rand(8, 3, 4, 4).half()
    cfg = TrainConfig(jitter_p=0.5, grayscale_p=0.5, blur_p=0.5)
    whole, whole_cams = augment_batch(images, cams, cfg, PATCH, torch.Generator().manual_seed(5))
    for offset in (0, 4):
        part, part_cams = augment_batch(images[offset:offset + 4], cams[offset:offset + 4], cfg, PATCH,
                                        torch.Generator().manual_seed(5), total=8, offset=offset)
        torch.testing.assert_close(part, whole[offset:offset + 4])
        torch.testing.assert_close(part_cams, whole_cams[offset:offset + 4])
    # uint8 in, the float numbers of images_to_tensor
    from pipeline.data.images import images_to_tensor
    from pipeline.data import to_float_images
    assert torch.equal(to_float_images(images), images_to_tensor(images.numpy()))


def test_loader_workers_never_inherit_the_parents_hdf5_handle(tmp_path, tiny_backbone):
    """The CamReader opens HDF5 lazily; nothing in the training process may read a CAM before
    the (forked, persistent) workers start, or they would share its handle."""
    import h5py

    from pipeline.store import CamReader

    images, cams, _ = colour_block_data(16, seed=8)
    with h5py.File(tmp_path / "labels.h5", "w") as f:
        f.create_dataset("cam", data=cams, chunks=(1, *cams.shape[1:]), compression="gzip")
    reader = CamReader(tmp_path / "labels.h5", list(range(16)))
    dataset = PseudoLabelDataset(lambda i: images[i], reader, 16)
    train_segmenter(tiny_backbone(), dataset, 3, fast_config(epochs=2, num_workers=1), tmp_path / "model",
                    log_fn=lambda s: None)
    assert reader._handle is None


def test_training_reads_its_workers_once_and_replays_with_persistent_workers(tmp_path, tiny_backbone, monkeypatch):
    """Workers start once per run, not per epoch, and a run with workers trains to the same bits
    as one without: the loader's seed is drawn from its own generator, not dropout's."""
    import torch.utils.data.dataloader as dl

    images, cams, _ = colour_block_data(16, seed=9)
    starts = []
    original = dl._MultiProcessingDataLoaderIter.__init__

    def counting_init(self, *args, **kwargs):
        starts.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(dl._MultiProcessingDataLoaderIter, "__init__", counting_init)
    cfg = dict(epochs=3, decoder_dropout=0.1, jitter_p=0.5)
    train_segmenter(tiny_backbone(), make_dataset(images, cams), 3, fast_config(num_workers=1, **cfg),
                    tmp_path / "workers", log_fn=lambda s: None)
    assert len(starts) == 1
    train_segmenter(tiny_backbone(), make_dataset(images, cams), 3, fast_config(num_workers=0, **cfg),
                    tmp_path / "inline", log_fn=lambda s: None)
    a = torch.load(tmp_path / "workers" / "model.pt", weights_only=True)["decoder"]
    b = torch.load(tmp_path / "inline" / "model.pt", weights_only=True)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_cache_holds_the_decoded_images_and_is_rebuilt_only_when_stale(tmp_path):
    from pipeline.train.data import ImageCache, build_image_cache

    images, _, _ = colour_block_data(6, seed=10)
    reads, lines = [], []

    def read(i):
        reads.append(i)
        return images[i]

    path = tmp_path / "train_images.npy"
    cache = build_image_cache(path, read, 6, (64, 64), {"images": ["a"]}, workers=2, log=lines.append)
    assert isinstance(cache, ImageCache) and len(cache) == 6 and len(lines) == 1
    assert all(np.array_equal(cache(i), images[i]) for i in range(6))
    build_image_cache(path, read, 6, (64, 64), {"images": ["a"]}, log=lines.append)
    assert len(reads) == 6 and len(lines) == 1                 # fresh: not decoded again
    build_image_cache(path, read, 6, (64, 64), {"images": ["b"]}, log=lines.append)
    assert len(reads) == 12 and len(lines) == 2                # other images: rebuilt
    assert not list(tmp_path.glob("*.partial"))
