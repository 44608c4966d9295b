"""Progress in logs: a long loop says where it is at a fixed interval when stderr is not a terminal;
decoding ahead of the compute, at a lower priority."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from pipeline.runtime import LogProgress, prefetched, progress


def test_log_progress_prints_a_line_per_interval_with_rate_and_time_left(capsys):
    now = [0.0]
    bar = LogProgress(total=100, desc="features", every=30, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 10
        bar.update(10)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["features: 30/100 img (1.0 img/s, 70 s left)", "features: 60/100 img (1.0 img/s, 40 s left)",
                     "features: 90/100 img (1.0 img/s, 10 s left)", "features: 100/100 img (1.0 img/s, 0 s left)"]


def test_short_loops_stay_silent_and_iteration_passes_items_through(capsys):
    assert list(LogProgress(range(5), desc="quick", every=30)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_progress_in_a_log_file_is_the_log_progress(capsys):
    # pytest captures stderr, so it is not a terminal here, as under DVC or `make demo > log`
    assert isinstance(progress(total=3, desc="x"), LogProgress)
    assert progress(total=3, desc="x", enabled=False).disable


def test_the_final_count_is_not_repeated(capsys):
    now = [0.0]
    bar = LogProgress(total=20, desc="features", every=30, clock=lambda: now[0])
    now[0] = 31
    bar.update(20)
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["features: 20/20 img (0.6 img/s, 0 s left)"]


def test_prefetched_keeps_order_runs_ahead_and_raises_in_place():
    started = []
    gate = threading.Event()

    def load(i: int) -> int:
        started.append(i)
        if i == 0:
            gate.wait(5)          # item 0 is slow: items 1 and 2 are loaded meanwhile
        if i == 4:
            raise ValueError("bad item 4")
        return i * 10

    results = prefetched(range(6), load, ahead=3)
    deadline = time.monotonic() + 5
    first = []
    thread = threading.Thread(target=lambda: first.append(next(results)))
    thread.start()
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started[:3]) == [0, 1, 2]          # three in flight before the first is used
    gate.set()
    thread.join(5)
    assert first == [0]
    assert [next(results) for _ in range(3)] == [10, 20, 30]
    with pytest.raises(ValueError, match="bad item 4"):
        next(results)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_prefetched_decodes_at_the_lowest_priority_and_leaves_the_callers_alone():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    seen = list(prefetched(range(3), lambda _: niceness(), ahead=2))
    assert seen == [19, 19, 19]          # decoding yields the cores to the stage's compute
    assert niceness() == before          # the compute's own thread keeps its priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_training_loader_workers_run_at_the_lowest_priority():
    import torch

    from pipeline.config import TrainConfig
    from pipeline.train.distributed import Ranks
    from pipeline.train.loop import GlobalBatches, _loader

    class Niceness(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, _: int) -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    config = TrainConfig(batch_size=1, num_workers=1)
    batches = GlobalBatches(2, config, Ranks())
    batches.order = [0, 1]
    assert [int(b) for b in _loader(Niceness(), config, batches, torch.device("cpu"))] == [19, 19]


def test_a_cuda_index_the_process_does_not_see_is_refused_with_what_it_sees(monkeypatch):
    import torch

    from pipeline.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match=r"'cuda:3' was asked for but torch sees 1 CUDA device\(s\) "
                                           r"\(CUDA_VISIBLE_DEVICES=5\)"):
        resolve_device("cuda:3")
