"""The training loop: `train_segmenter` runs epochs of `train_step` and tells its hooks.

Hooks (progress on a terminal and in logs, `last.pt` / `train_log.csv` / `model.pt`)
see the :class:`TrainState` at fixed points, so the loop itself is only the method:
seed the epoch, update the teacher when the schedule says so, one pass over the data.
"""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import TrainConfig
from pipeline.errors import InputError
from pipeline.files import atomic_write
from pipeline.runtime import autocast, progress, yield_to_compute
from pipeline.train.augment import augment_batch
from pipeline.train.curves import LOSS_TERMS
from pipeline.train.data import collate_samples, raise_if_failed
from pipeline.train.distributed import Ranks, all_sum, barrier, setup
from pipeline.train.losses import crop_cam_scores, diversity_loss, peer_loss, pseudo_targets, uncertainty_loss
from pipeline.train.schedule import epoch_seed, is_teacher_update_epoch, peer_alpha
from pipeline.train.state import (TrainState, backbone_identity, checkpoint_mismatch, save_checkpoint,
                                  save_model)

LOG_COLUMNS = ("epoch", *LOSS_TERMS, "alpha", "teacher_update", "seconds")
# The bar's loss is read from the device (a host sync) at most this often, not every step.
LOSS_SHOWN_EVERY = 2.0


def train_segmenter(backbone: nn.Module, dataset: Dataset, num_classes: int, config: TrainConfig,
                    out_dir: str | Path, progress: bool = True,
                    log_fn: Callable[[str], None] | None = None,
                    background_threshold: float | None = None) -> Path:
    """Train the decoder on the dataset's CAMs; resumable; returns ``out_dir/model.pt``.

    Args:
        backbone: frozen Backbone (``forward(x) -> .patch (B, h, w, D)``, ``embed_dim``,
            ``patch_size``).
        dataset: a :class:`~pipeline.train.data.PseudoLabelDataset` (or anything yielding
            (image uint8 (H, W, 3) or float (3, H, W), cam (K, h, w), index)).
        num_classes: K, the number of CAM channels / concepts.
        config: training constants.
        out_dir: receives ``last.pt`` and ``train_log.csv`` (every epoch) and ``model.pt``.
        progress: a bar on a terminal; one line per epoch either way.
        log_fn: receives the per-epoch and event lines instead of stdout.
        background_threshold: for object-centric pseudo labels (the last CAM channel is the
            background): the background is recomputed on every crop with this threshold
            (:func:`~pipeline.train.losses.crop_cam_scores`); None for thing-stuff sets.

    A ``last.pt`` already in ``out_dir`` is resumed when it can reach exactly the result of
    a run from scratch (same settings up to ``epochs``, ``num_workers``, ``device``,
    ``predict_with``, ``image_cache``, and no more epochs done than asked); otherwise
    training starts over and says why in one line. ``model.pt`` is always the last epoch's
    decoder (no label-based selection).

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: each holds
    ``batch_size / WORLD_SIZE`` samples of every global batch (the same samples and
    augmentation draws a single process would use), the student is wrapped in
    DistributedDataParallel, and only rank 0 writes files and prints. The checkpoint does not
    depend on the number of processes, so a run resumes with another one.
    """
    ranks, device = setup(config.device)
    _check_dataset(dataset, config, ranks)
    backbone = backbone.to(device).eval().requires_grad_(False)
    identity = backbone_identity(backbone)
    state = TrainState.create(identity["embed_dim"], num_classes, config, device)
    quiet = (lambda _: None) if not ranks.main else log_fn
    report = ProgressHook(progress and ranks.main, quiet, samples_per_epoch(len(dataset), config), ranks)
    files = FilesHook(Path(out_dir), identity, ranks)
    hooks = (report, files)
    files.resume(state, report.message)
    # DDP averages the gradients of the ranks' equal parts: the gradient of the global batch's mean loss
    student = state.student if not ranks.enabled else DistributedDataParallel(
        state.student, device_ids=[device.index] if device.type == "cuda" else None)
    batches = GlobalBatches(len(dataset), config, ranks)
    loader = _loader(dataset, config, batches, device)
    for epoch in range(state.epoch, config.epochs):
        tic, generator = time.perf_counter(), _seed_epoch(config.seed, epoch, ranks.rank)
        updated = is_teacher_update_epoch(epoch, config)
        state.begin_epoch(epoch, updated)
        bootstrapping = config.bootstrap and epoch >= config.bootstrap_start and state.has_teacher
        alpha = peer_alpha(state.since_update, config) if bootstrapping else 0.0
        # `repeat` passes shuffled together, as one shuffle of `repeat` concatenated copies
        batches.order = (torch.randperm(len(dataset) * config.repeat, generator=generator) % len(dataset)).tolist()
        for hook in hooks:
            hook.before_epoch(state, epoch, updated)
        stats = run_epoch(backbone, state, loader, state.teacher if bootstrapping else None, alpha, generator,
                          device, report, background_threshold, student=student, num_classes=num_classes,
                          ranks=ranks)
        row = {"epoch": epoch, **{k: round(v, 6) for k, v in stats.items()}, "alpha": alpha,
               "teacher_update": int(updated), "seconds": round(time.perf_counter() - tic, 3)}
        state.history.append(row)
        state.epoch = epoch + 1
        for hook in hooks:
            hook.after_epoch(state, row)
    for hook in hooks:
        hook.after_train(state)
    barrier(ranks)   # model.pt is written before any rank returns
    return files.model_path


def run_epoch(backbone: nn.Module, state: TrainState, loader: DataLoader, teacher: nn.Module | None,
              alpha: float, generator: torch.Generator, device: torch.device,
              report: "ProgressHook", background_threshold: float | None = None, *,
              student: nn.Module | None = None, num_classes: int | None = None,
              ranks: Ranks = Ranks()) -> dict[str, float]:
    """One pass over the data; returns image-weighted means of the loss terms over all ranks.

    The terms are summed on the device; the host waits for the device only when the progress
    bar shows a loss (every LOSS_SHOWN_EVERY seconds) and once at the end of the epoch.
    """
    state.student.train()
    sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=device)   # terms x n, then n
    try:
        for batch in loader:
            images, cams, _ = raise_if_failed(batch)
            if num_classes is not None and cams.shape[1] != num_classes:
                raise ValueError(f"the CAMs have {cams.shape[1]} channels but num_classes={num_classes}")
            n = images.shape[0]
            terms = train_step(backbone, state, images, cams, teacher, alpha, generator, device,
                               background_threshold, student=student, total=n * ranks.world_size,
                               offset=ranks.rank * n)
            step = torch.stack([terms[k].double() for k in LOSS_TERMS])
            sums[:-1] += step * n
            sums[-1] += n
            report.after_step(n * ranks.world_size, terms["loss"])
    finally:
        report.end_bar()
    totals = all_sum(sums, ranks).tolist()
    means = {k: v / max(totals[-1], 1) for k, v in zip(LOSS_TERMS, totals)}
    if not math.isfinite(means["loss"]):
        raise FloatingPointError(f"epoch {state.epoch}: loss is {means['loss']}; stopping "
                                 f"(last.pt keeps epoch {state.epoch})")
    return means


def train_step(backbone: nn.Module, state: TrainState, images: Tensor, cams: Tensor, teacher: nn.Module | None,
               alpha: float, generator: torch.Generator, device: torch.device,
               background_threshold: float | None = None, *, student: nn.Module | None = None,
               total: int | None = None, offset: int = 0) -> dict[str, Tensor]:
    """Augment one batch, compute the loss terms, take one optimiser step; returns the terms
    (0-d tensors on the device: reading them waits for the device).

    images uint8 (B, H, W, 3) (or float (B, 3, H, W) in [0, 1]), cams (B, K, h, w) on the
    training size's patch grid, any float dtype (the last channel the background when
    ``background_threshold`` is given); both converted to float32 on the device.
    student: what runs the student's forward (its DistributedDataParallel wrapper under
    torchrun; default ``state.student``). total, offset: this batch is samples
    [offset, offset + B) of a global batch of ``total`` (see ``augment_batch``).
    """
    config = state.config
    images = images.to(device, non_blocking=True)
    cams = cams.to(device, non_blocking=True).float()
    with torch.no_grad():
        images, cams = augment_batch(images, cams, config, int(backbone.patch_size), generator, total, offset)
    with autocast(device):
        with torch.no_grad():
            feats = backbone(images).patch
        logits, class_emb = (state.student if student is None else student)(feats, return_class_embeddings=True)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(feats).float()
    logits = logits.float()
    if cams.shape[-2:] != logits.shape[-2:]:  # backbone grid differs from the crop's patch grid
        cams = F.interpolate(cams, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        cam_scores, foreground = crop_cam_scores(cams, config.cam_norm, background_threshold)
        scores, target = pseudo_targets(cam_scores, teacher_logits, config.teacher_mix)
    # Built in this order (ce, uncertainty, diversity): the order the terms are created in is the
    # order backward adds their gradients, and a run must train to the same last bit as before.
    terms = {"ce": F.cross_entropy(logits, target)}
    # object-centric: the uncertainty of the concepts only, on the foreground (reference)
    terms["uncertainty"] = uncertainty_loss(logits) if foreground is None else \
        uncertainty_loss(logits[:, :-1], foreground)
    terms["diversity"] = diversity_loss(class_emb)
    loss = terms["ce"] + config.uncertainty_weight * terms["uncertainty"] + config.diversity_weight * terms["diversity"]
    terms["peer"] = logits.new_zeros(())
    if teacher is not None and alpha > 0:
        terms["peer"] = peer_loss(logits, scores, alpha, generator)
        loss = loss - terms["peer"]
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip_value > 0:
        nn.utils.clip_grad_value_(state.student.parameters(), config.grad_clip_value)
    state.optimizer.step()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


# ----------------------------------------------------------------------------- hooks
class Hook:
    """What `train_segmenter` calls; a hook overrides the points it needs."""

    def before_epoch(self, state: TrainState, epoch: int, teacher_updated: bool) -> None: ...

    def after_epoch(self, state: TrainState, row: dict[str, Any]) -> None: ...

    def after_train(self, state: TrainState) -> None: ...


class ProgressHook(Hook):
    """A per-epoch bar (img/s, time left) on a terminal via `runtime.progress`; the epoch
    summaries and events are printed either way, so logs get one line per epoch."""

    def __init__(self, enabled: bool, log_fn: Callable[[str], None] | None, images: int,
                 ranks: Ranks = Ranks()) -> None:
        self.enabled, self.log_fn, self.images = enabled, log_fn, images
        self.ranks = ranks
        self.bar = None
        self.shown = -math.inf

    def message(self, msg: str) -> None:
        if self.log_fn is not None:
            self.log_fn(msg)
        elif self.enabled:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def before_epoch(self, state: TrainState, epoch: int, teacher_updated: bool) -> None:
        if teacher_updated:
            self.message(f"epoch {epoch}: teacher <- student, student <- initial weights")
        self.bar = progress(total=self.images, desc=f"epoch {epoch + 1}/{state.config.epochs}",
                            enabled=self.enabled)

    def after_step(self, n: int, loss: Tensor) -> None:
        """``n`` more samples (over all ranks); ``loss`` is read (a host sync) only when shown."""
        if self.bar is None or not self.enabled:
            return
        self.bar.update(n)
        now = time.monotonic()
        if now - self.shown >= LOSS_SHOWN_EVERY:
            self.shown = now
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def end_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_epoch(self, state: TrainState, row: dict[str, Any]) -> None:
        self.message(
            f"epoch {state.epoch}/{state.config.epochs} loss {row['loss']:.4f} ce {row['ce']:.4f} "
            f"unc {row['uncertainty']:.4f} div {row['diversity']:.4f} peer {row['peer']:.4f} "
            f"({row['seconds']:.1f} s, {self.images / max(row['seconds'], 1e-9):.1f} img/s)")


class FilesHook(Hook):
    """``last.pt`` and ``train_log.csv`` after every epoch, ``model.pt`` at the end."""

    def __init__(self, out_dir: Path, identity: dict[str, Any], ranks: Ranks = Ranks()) -> None:
        if ranks.main:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.identity, self.ranks = identity, ranks
        self.last_path, self.model_path, self.log_path = (out_dir / "last.pt", out_dir / "model.pt",
                                                          out_dir / "train_log.csv")

    def resume(self, state: TrainState, say: Callable[[str], None]) -> None:
        """Load ``last.pt`` into ``state`` when it can be resumed; otherwise drop it and say why.

        Every rank reads it; rank 0 removes a stale one only after all have read it."""
        found = self.last_path.exists()
        ckpt, why = checkpoint_mismatch(self.last_path, state, self.identity) if found else (None, "")
        barrier(self.ranks)
        if not found:
            return
        if why:
            say(f"train: not resuming {self.last_path} ({why}); starting over")
            if self.ranks.main:
                self.last_path.unlink()
            return
        state.load_state_dict(ckpt["state"])
        say(f"resuming from {self.last_path} after epoch {state.epoch}/{state.config.epochs}")

    def after_epoch(self, state: TrainState, row: dict[str, Any]) -> None:
        if self.ranks.main:
            save_checkpoint(self.last_path, state, self.identity)
            self._write_log(state.history)

    def after_train(self, state: TrainState) -> None:
        if self.ranks.main:
            self._write_log(state.history)
            save_model(self.model_path, state, self.identity)

    def _write_log(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(LOG_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in LOG_COLUMNS})
        atomic_write(self.log_path, buffer.getvalue())


# ----------------------------------------------------------------------------- helpers
def _check_dataset(dataset: Dataset, config: TrainConfig, ranks: Ranks) -> None:
    # Nothing is read from the dataset here: an item read in this process before the loader's
    # workers fork would hand them an open HDF5 handle (the CAM channels are checked per batch).
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if steps_per_epoch(len(dataset), config) == 0:
        raise InputError(None, f"train.batch_size {config.batch_size} is more than the {len(dataset) * config.repeat} "
                               f"samples of an epoch: with train.drop_last no step would be taken")
    if config.batch_size % ranks.world_size:
        raise InputError(None, f"train.batch_size {config.batch_size} cannot be split evenly over "
                               f"{ranks.world_size} processes (WORLD_SIZE): use a multiple of {ranks.world_size}")


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Seed the global generator (dropout) and return the epoch's own generator (order,
    augmentation, peer permutation). The epoch generator is the same on every rank (they
    share the order and the draws of each global batch); the global one differs per rank
    (each rank's dropout is its own), and rank 0's is a single process's."""
    seed = epoch_seed(seed, epoch)
    torch.manual_seed((seed + rank * 1_000_000_007) % (2**63 - 1))
    return torch.Generator().manual_seed(seed)


def steps_per_epoch(images: int, config: TrainConfig) -> int:
    """Optimiser steps in one epoch of ``images`` training images."""
    samples = images * config.repeat
    return samples // config.batch_size if config.drop_last else -(-samples // config.batch_size)


def samples_per_epoch(images: int, config: TrainConfig) -> int:
    """Training samples one epoch sees (the dropped partial batch not counted)."""
    return steps_per_epoch(images, config) * config.batch_size if config.drop_last else images * config.repeat


class GlobalBatches(Sampler[list[int]]):
    """This rank's part of every global batch of an epoch (a DataLoader ``batch_sampler``).

    Global batch ``s`` is ``order[s * batch_size : (s + 1) * batch_size]``, as for one process;
    rank ``r`` of ``W`` takes its ``r``-th equal slice. Every rank takes the same number of
    steps with the same number of samples: a last partial batch (``drop_last`` false) is
    padded to a multiple of ``W`` with samples from the start of the order. Set ``order``
    (the epoch's shuffled dataset indices) before iterating; the loader's workers persist
    across epochs and take each epoch's order from here.
    """

    def __init__(self, images: int, config: TrainConfig, ranks: Ranks) -> None:
        self.steps = steps_per_epoch(images, config)
        self.batch_size, self.ranks = config.batch_size, ranks
        self.order: list[int] = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        world, rank = self.ranks.world_size, self.ranks.rank
        for step in range(self.steps):
            batch = self.order[step * self.batch_size:(step + 1) * self.batch_size]
            part = -(-len(batch) // world)
            batch = batch + [self.order[i % len(self.order)] for i in range(part * world - len(batch))]
            yield batch[rank * part:(rank + 1) * part]


def _loader(dataset: Dataset, config: TrainConfig, batches: GlobalBatches, device: torch.device) -> DataLoader:
    """One loader for the whole run: its workers start once and persist across epochs.

    The loader draws its workers' base seed from its own generator, never from the global one
    that dropout draws from, so a resumed run's random streams are an uninterrupted run's
    (the workers themselves draw nothing: they read and hand over stored bytes). Workers run at
    the lowest priority, taking the cycles the training step leaves (yield_to_compute)."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0, pin_memory=device.type == "cuda",
                      worker_init_fn=yield_to_compute, collate_fn=collate_samples,
                      generator=torch.Generator().manual_seed(int(config.seed)))
