"""Errors that carry the offending file, so every message starts with where to look."""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input data (image, label, folder, weights file): names the path and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ProvenanceError(ValueError):
    """An artifact was written by another backbone or configuration than the one asked for."""
