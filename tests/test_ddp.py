"""Training under torchrun: two CPU processes (gloo) train, resume with another number of
processes, and follow the loss curve of one process with the same global batch."""
from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import TrainConfig
from pipeline.train.distributed import Ranks
from pipeline.train.loop import GlobalBatches, train_segmenter
from tests.conftest import TinyBackbone
from tests.test_train import colour_block_data, fast_config, make_dataset

# bootstrapping (teacher updates, peer loss) and every photometric op on: all of the loop's
# random draws are exercised across the process boundary
SETTINGS = dict(batch_size=8, bootstrap=True, bootstrap_start=1, teacher_interval=1, jitter_p=0.5,
                grayscale_p=0.3, blur_p=0.3)


def _dataset():
    images, cams, _ = colour_block_data(32, seed=7)
    return make_dataset(images, cams)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, epochs: int, report: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then the library call."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pipeline.train.distributed import ranks_from_env, teardown

    steps, lines = [], []
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = counting_step
    try:
        train_segmenter(TinyBackbone(), _dataset(), 3, fast_config(epochs=epochs, **SETTINGS), Path(out_dir),
                        progress=False, log_fn=lines.append)
    finally:
        teardown(ranks_from_env())
    Path(report, f"rank{rank}.json").write_text(json.dumps({"steps": len(steps), "lines": lines}))


def _spawn(world: int, out_dir: Path, epochs: int, report: Path) -> list[dict]:
    report.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, _free_port(), str(out_dir), epochs, str(report)), nprocs=world, join=True)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(world)]


def _log(folder: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(folder / "train_log.csv"))]


def test_two_processes_train_resume_with_another_count_and_follow_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train_segmenter(TinyBackbone(), _dataset(), 3, fast_config(epochs=3, **SETTINGS), single, progress=False,
                    log_fn=lambda _: None)
    # 1 process for epoch 1, 2 processes for epoch 2 (resumed), 1 process again for epoch 3 (resumed)
    train_segmenter(TinyBackbone(), _dataset(), 3, fast_config(epochs=1, **SETTINGS), ddp, progress=False,
                    log_fn=lambda _: None)
    reports = _spawn(2, ddp, 2, tmp_path / "report")
    assert [r["steps"] for r in reports] == [4, 4]          # 32 images / global batch 8, on each rank
    assert any(l.startswith("resuming") for l in reports[0]["lines"])
    assert reports[1]["lines"] == []                        # rank 1 prints nothing (and writes nothing)
    assert torch.load(ddp / "last.pt", weights_only=True)["state"]["epoch"] == 2
    lines: list[str] = []
    train_segmenter(TinyBackbone(), _dataset(), 3, fast_config(epochs=3, **SETTINGS), ddp, progress=False,
                    log_fn=lines.append)
    assert any(l.startswith("resuming") and "after epoch 2/3" in l for l in lines)

    a, b = _log(single), _log(ddp)
    assert [r["epoch"] for r in b] == [0, 1, 2] and [r["teacher_update"] for r in b] == [0, 1, 1]
    assert b[0] == {**a[0], "seconds": b[0]["seconds"]}     # epoch 1: one process both times
    # same samples, same augmentation draws and the mean of equal halves' gradients: the same
    # curve up to float rounding (dropout is off in these settings)
    for ra, rb in zip(a[1:], b[1:]):
        for term in ("loss", "ce", "uncertainty", "diversity", "peer"):
            assert rb[term] == pytest.approx(ra[term], rel=1e-3, abs=1e-5), (rb["epoch"], term)
    model_a = torch.load(single / "model.pt", weights_only=True)["decoder"]
    model_b = torch.load(ddp / "model.pt", weights_only=True)["decoder"]
    for k in model_a:
        torch.testing.assert_close(model_b[k], model_a[k], rtol=1e-3, atol=1e-4)


def test_every_rank_takes_its_equal_part_of_each_global_batch():
    order = list(range(100, 121))                           # 21 samples, global batch 8
    for drop_last, steps in ((True, 2), (False, 3)):
        config = TrainConfig(batch_size=8, drop_last=drop_last)
        parts = []
        for rank in range(4):
            batches = GlobalBatches(21, config, Ranks(rank, 4, rank))
            batches.order = order
            parts.append(list(batches))
        assert all(len(p) == steps for p in parts)
        for step in range(steps):
            sizes = {len(p[step]) for p in parts}
            assert len(sizes) == 1                          # equal on every rank
            joined = [i for p in parts for i in p[step]]
            expected = order[step * 8:(step + 1) * 8]
            assert joined[:len(expected)] == expected       # the one-process batch, in order
        # the last partial batch (5 samples) padded to 4 x 2 from the start of the order
        if not drop_last:
            assert [i for p in parts for i in p[2]] == order[16:] + order[:3]
        one = GlobalBatches(21, config, Ranks())
        one.order = order
        assert [i for b in one for i in b] == (order[:16] if drop_last else order)


def test_a_process_count_that_does_not_divide_the_batch_is_refused_before_relaunching(monkeypatch):
    from pipeline.errors import InputError
    from pipeline.train.stage import PROCS_ENV, relaunch_under_torchrun

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(PROCS_ENV, "3")
    monkeypatch.setattr("sys.argv", ["transfgu", "train"])
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("torchrun was started"))
    with pytest.raises(InputError, match="batch_size 16 cannot be split evenly over TRANSFGU_TRAIN_PROCS=3"):
        relaunch_under_torchrun(16)
