"""Where code runs and how it reports: device choice, mixed precision, progress bars."""
from __future__ import annotations

import collections
import contextlib
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

if TYPE_CHECKING:  # torch is imported where a device is needed: log() and progress() stay light
    import torch

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(name: str = "auto") -> "torch.device":
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(f"device {name!r} was asked for but torch sees {torch.cuda.device_count()} CUDA "
                           f"device(s){f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; "
                           "use 'cuda' or 'auto' (a dask worker with compute.gpus sees only its own GPU, as cuda:0)")
    return device


def autocast(device: "torch.device | str") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the frozen backbone's matmuls dominate); full precision on CPU,
    where bf16 is slower on most processors."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


LOG_EVERY_SECONDS = 30.0     # how often a long stage says where it is when stderr is a log file


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "img", enabled: bool = True) -> "Iterator[T] | tqdm | LogProgress":
    """Progress of a long loop: a tqdm bar with rate and time left on a terminal; in a log
    file (CI, `make demo > log`, DVC's captured output) one line every LOG_EVERY_SECONDS
    with the same figures, so a stage is never silent for minutes. ``enabled=False`` is silent."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


class LogProgress:
    """The part of tqdm's interface the stages use, writing a plain line to stderr at most
    every ``every`` seconds (and one at the end of a loop that logged before)."""

    disable = True      # callers that print around a live bar print directly instead

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "img", every: float | None = None, clock=time.monotonic) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.every = LOG_EVERY_SECONDS if every is None else every
        self.clock = clock
        self.n, self.postfix, self.logged, self.logged_n = 0, "", False, -1
        self.start = self.last = clock()

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.every:
            self._line()

    def set_postfix(self, refresh: bool = True, **values: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        log(message)

    def close(self) -> None:
        # the final count, once, if the loop logged before (short loops stay silent: their
        # stage prints a summary)
        if self.logged and self.n != self.logged_n:
            self._line()
        self.logged = False

    def _line(self) -> None:
        now = self.clock()
        rate = self.n / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        left = f", {(self.total - self.n) / rate:.0f} s left" if self.total and rate > 0 else ""
        log(f"{self.desc}: {done} {self.unit} ({rate:.1f} {self.unit}/s{left})"
            + (f" {self.postfix}" if self.postfix else ""))
        self.last, self.logged, self.logged_n = now, True, self.n


def to_device(tensor: "torch.Tensor", device: "torch.device") -> "torch.Tensor":
    """A CPU tensor (random draws, indices, boxes) on ``device`` without making the host wait:
    on CUDA through pinned memory, asynchronously. A plain ``.to("cuda")`` from pageable memory
    first waits for all the work queued on the GPU, so a few per training step would keep the
    CPU from ever running ahead of it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def decode_threads() -> int:
    """Threads decoding ahead of the compute: half the cores this process may use, 2 to 8 (2 on
    these 2-core machines; 8 on a 16-core GPU node, where fewer could not keep a GPU fed: JPEG
    decoding and resizing run at about 250 images/s per core)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(2, min(8, cores // 2))


def yield_to_compute(*_: object) -> None:
    """Lower the calling thread's scheduling priority to the lowest (nice 19; Linux only, where a
    thread has its own): for threads and loader workers that feed a stage's compute. With the
    CPU shared (2 cores here: torch's threads take both), equal priority lets a decode thread
    stall torch's parallel regions, whose threads all wait for the one the scheduler preempted;
    at nice 19 decoding takes the cycles the compute leaves, and gets a core whenever the compute
    waits for it (make bench-stages: pseudolabels 0.81-0.91 at equal priority, 0.85-0.96 at 19,
    over three alternating runs each). Threads the caller starts later inherit it. Arguments
    are ignored, so that it serves as a DataLoader ``worker_init_fn``."""
    import os
    import threading

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):      # a sandbox may refuse it: then priorities stay equal
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def prefetched(items: Iterable[T], load: Callable[[T], R], ahead: int | None = None,
               threads: int | None = None) -> Iterator[R]:
    """``load(item)`` for every item, in order, each computed ``ahead`` items in advance (default
    ``threads``) on a pool of ``threads`` (default decode_threads()): image decoding and resizing
    (PIL releases the GIL) overlap the stage's compute, at a lower priority (yield_to_compute).
    An exception in ``load`` (an unreadable image: an InputError naming it) is raised when its
    item comes up, after the items before it were used."""
    threads = decode_threads() if threads is None else max(1, threads)
    ahead = max(1, threads if ahead is None else ahead)
    with ThreadPoolExecutor(max_workers=threads, initializer=yield_to_compute) as pool:
        source = iter(items)
        pending = collections.deque(pool.submit(load, item) for item in itertools.islice(source, ahead))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(source, 1):
                pending.append(pool.submit(load, item))
            yield result


def prefetched_batches(batches: Sequence[Sequence[T]], load: Callable[[T], R],
                       threads: int | None = None) -> Iterator[list[R]]:
    """``[load(item) for item in batch]`` for every batch, in order: prefetched one item per task,
    ``threads`` batches' worth ahead (default decode_threads()). Per item, not per batch, so
    that every thread works on the batch the compute waits for: the first batch of a shard is
    decoded by all of them, not by one while the others start on later batches. Consume it
    under ``contextlib.closing``: a traceback keeps the consumer's frame, and with it the pool."""
    threads = decode_threads() if threads is None else max(1, threads)
    size = max((len(batch) for batch in batches), default=1)
    loaded = prefetched((item for batch in batches for item in batch), load, ahead=threads * size, threads=threads)
    try:
        for batch in batches:
            yield [next(loaded) for _ in batch]
    finally:
        loaded.close()       # closing this generator ends the pool's threads


def import_faiss():
    """The faiss module, or an ImportError that says how to install it: it is not a plain
    dependency but one of two extras, faiss-cpu or faiss-gpu (pyproject.toml), as both own faiss/."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("faiss is not installed: pip install -e '.[cpu]', or '.[gpu]' on a CUDA machine "
                          "(make install picks one)") from exc
    return faiss


def log(message: str) -> None:
    """One line on stderr, for stage summaries that must appear in logs too."""
    print(message, file=sys.stderr, flush=True)
