"""Where code runs and how it reports: device choice, mixed precision, progress bars."""
from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

if TYPE_CHECKING:  # torch is imported where a device is needed: log() and progress() stay light
    import torch

T = TypeVar("T")


def resolve_device(name: str = "auto") -> "torch.device":
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return device


def autocast(device: "torch.device") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the frozen backbone's matmuls dominate); full precision on CPU,
    where bf16 is slower on most processors."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "img", enabled: bool = True) -> Iterator[T] | tqdm:
    """A tqdm bar with rate and time left on a terminal; silent when stderr is a log file
    (DVC's output stays readable), where stages print one summary line instead."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def log(message: str) -> None:
    """One line on stderr, for stage summaries that must appear in logs too."""
    print(message, file=sys.stderr, flush=True)
