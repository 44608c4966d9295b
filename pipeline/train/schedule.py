"""The bootstrapping schedule (reference semantics) and the per-epoch seeds.

``teacher_interval`` is one int or a list whose i-th entry holds for epochs
``[i*teacher_interval_block, (i+1)*teacher_interval_block)`` (the last entry holds for
ever after); an epoch ``e >= bootstrap_start`` with ``e % interval(e) == 0`` starts with
a teacher update: teacher <- student, student <- its initial weights. Epochs are
0-based. alpha = ``peer_alpha_start + peer_alpha_step * (epochs since the last teacher
update)``, capped at ``peer_alpha_end``.
"""
from __future__ import annotations

from pipeline.config import TrainConfig


def teacher_interval_at(epoch: int, config: TrainConfig) -> int:
    """Teacher-update interval in force at ``epoch`` (reference: one list entry per
    ``teacher_interval_block`` epochs, the last entry repeating)."""
    intervals = config.teacher_interval if isinstance(config.teacher_interval, list) else [config.teacher_interval]
    return intervals[min(epoch // config.teacher_interval_block, len(intervals) - 1)]


def is_teacher_update_epoch(epoch: int, config: TrainConfig) -> bool:
    """Whether epoch ``epoch`` (0-based) starts with teacher <- student, student <- init.

    Reference rule: ``epoch >= bootstrap_start and epoch % interval == 0``. We also force
    an update at ``bootstrap_start`` itself so bootstrapping never starts against an
    untrained teacher (the reference would, if ``bootstrap_start`` were not a multiple of
    the interval; for all of the paper's settings the two rules agree).
    """
    if not config.bootstrap or epoch < config.bootstrap_start:
        return False
    return epoch == config.bootstrap_start or epoch % teacher_interval_at(epoch, config) == 0


def teacher_update_epochs(config: TrainConfig) -> list[int]:
    """All teacher-update epochs of a run of ``config.epochs`` epochs."""
    return [e for e in range(config.epochs) if is_teacher_update_epoch(e, config)]


def peer_alpha(epochs_since_update: int, config: TrainConfig) -> float:
    """Weight of the peer (negative) loss: the reference's list 0.03, 0.04, ..., 0.10
    indexed by epochs since the last teacher update, its last value repeating."""
    alpha = config.peer_alpha_start + config.peer_alpha_step * epochs_since_update
    return round(min(alpha, config.peer_alpha_end), 10)


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch is seeded from (seed, epoch) alone, so a resumed run replays exactly."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63 - 1)
