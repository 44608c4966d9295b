"""Shared entry point of the stage modules: params.yaml in, one pipeline job run, a clean error out."""
from __future__ import annotations

import sys

from pipeline.config import load_config
from pipeline.errors import InputError, ProvenanceError
from pipeline.jobs import run_job


def run_stage(name: str, params: str = "params.yaml") -> None:
    try:
        run_job(name, load_config(params, sys.argv[1:]))
    except (InputError, ProvenanceError) as exc:
        print(f"error in stage '{name}': {exc}", file=sys.stderr)
        sys.exit(2)
