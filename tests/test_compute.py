"""The shard executor (pipeline/compute.py): in process and on a real LocalCluster of worker
processes on CPU, per-worker caching, errors, retries, SLURM job scripts; the `compute` section."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import compute as compute_mod
from pipeline.compute import (WorkerLost, clear_worker_cache, gpu_for_worker, local_cluster, run_shards,
                              shard_progress, slurm_cluster, worker_cached)
from pipeline.config import ComputeConfig, Config, JobqueueConfig, load_config
from pipeline.errors import InputError
from pipeline.stages import PROJECT_ROOT, STAGES
from pipeline.store import shards

distributed = pytest.importorskip("distributed")


# ----------------------------------------------------------------------------- work functions
# Module level, so that they pickle by reference and the worker processes import them.
@dataclass(frozen=True)
class Rows:
    """A deterministic array per shard, as a stage's shard would compute from its rows."""
    seed: int

    def __call__(self, shard: tuple[int, int]) -> np.ndarray:
        start, stop = shard
        rows = np.arange(start, stop, dtype=np.float64)[:, None]
        return np.sin(rows * (self.seed + 1) + np.arange(5)) * 1000


_builds: dict = {}


def _build_token(key: str) -> str:
    _builds[key] = _builds.get(key, 0) + 1
    return f"{os.getpid()}-{_builds[key]}"


@dataclass(frozen=True)
class Cached:
    key: str

    def __call__(self, shard: tuple[int, int]) -> tuple[int, str, int]:
        token = worker_cached(("test", self.key), lambda: _build_token(self.key))
        return os.getpid(), token, _builds[self.key]


@dataclass(frozen=True)
class BadFile:
    """Raises the InputError a stage raises for an unreadable image, counting its attempts."""
    attempts: str
    bad: tuple[int, int]

    def __call__(self, shard: tuple[int, int]) -> int:
        if shard == self.bad:
            with open(self.attempts, "a") as handle:
                handle.write("x\n")
            raise InputError("data/images/train_00006.jpg", "cannot read image (truncated JPEG)")
        return shard[0]


class Transient(Exception):
    """An exception whose __init__ takes other arguments than its args, like InputError's."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"{where}: code {code}")
        self.code = code


@dataclass(frozen=True)
class FailsTwice:
    """Raises on its first two attempts at every shard, then succeeds."""
    folder: str

    def __call__(self, shard: tuple[int, int]) -> int:
        marker = Path(self.folder) / f"{shard[0]}"
        attempts = len(marker.read_text()) if marker.exists() else 0
        marker.write_text("x" * (attempts + 1))
        if attempts < 2:
            raise Transient(attempts, f"shard {shard}")
        return attempts


@dataclass(frozen=True)
class DiesOnce:
    """Kills its worker process the first time (before the marker file exists)."""
    marker: str

    def __call__(self, shard: tuple[int, int]) -> int:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("died once")
            os._exit(1)
        return shard[0] * 10


def always_dies(shard: tuple[int, int]) -> None:
    os._exit(1)


def worker_environment(shard: tuple[int, int]) -> tuple:
    import torch

    worker = distributed.get_worker()
    return worker.name, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.get_num_threads(), os.getpid()


# ----------------------------------------------------------------------------- a shared cluster
@pytest.fixture(scope="module")
def client():
    """One LocalCluster of 2 worker processes for the module (starting one takes seconds)."""
    cluster = local_cluster(ComputeConfig(scheduler="dask", workers=2, retries=2))
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


def _collect(shard_list, work, **kwargs):
    got = {}
    run_shards(shard_list, work, on_result=lambda shard, result: got.__setitem__(shard, (result, os.getpid())),
               show_progress=False, **kwargs)
    return got


# ----------------------------------------------------------------------------- run_shards
def test_local_runs_every_shard_in_order_in_this_process():
    order = []
    run_shards(list(shards(10, 4)), Rows(0), on_result=lambda s, r: order.append((s, r.shape)), show_progress=False)
    assert order == [((0, 4), (4, 5)), ((4, 8), (4, 5)), ((8, 10), (2, 5))]
    # ComputeConfig() is the local scheduler too
    assert list(_collect(list(shards(10, 4)), Rows(0), compute=ComputeConfig())) == [(0, 4), (4, 8), (8, 10)]


def test_dask_gives_the_results_of_the_local_run(client):
    todo = list(shards(23, 4))
    local = _collect(todo, Rows(3))
    remote = _collect(todo, Rows(3), compute=client)
    assert sorted(remote) == sorted(local) == todo
    for shard in todo:
        np.testing.assert_array_equal(remote[shard][0], local[shard][0])
        assert remote[shard][1] == os.getpid()     # on_result runs in the calling process


def test_worker_cached_builds_once_per_worker_process(client):
    results = _collect(list(shards(40, 2)), Cached("per-worker"), compute=client)
    by_pid: dict[int, set] = {}
    for (pid, token, builds), caller in results.values():
        assert pid != caller and builds == 1
        by_pid.setdefault(pid, set()).add(token)
    assert all(len(tokens) == 1 for tokens in by_pid.values())


def test_worker_cached_in_process():
    clear_worker_cache(("test", "local"))
    results = _collect(list(shards(6, 2)), Cached("local"))
    assert {r[0][1] for r in results.values()} == {f"{os.getpid()}-1"}
    assert worker_cached(("test", "local"), lambda: "other") == f"{os.getpid()}-1"
    clear_worker_cache(("test", "local"))
    assert worker_cached(("test", "local"), lambda: "other") == "other"
    clear_worker_cache(("test", "local"))


def test_an_input_error_reaches_the_caller_as_itself_and_is_not_retried(client, tmp_path):
    attempts = tmp_path / "attempts"
    done = []
    with pytest.raises(InputError) as info:
        run_shards(list(shards(12, 2)), BadFile(str(attempts), (6, 8)), compute=client, retries=2,
                   on_result=lambda s, r: done.append(s), show_progress=False)
    assert str(info.value) == "data/images/train_00006.jpg: cannot read image (truncated JPEG)"
    assert info.value.path == "data/images/train_00006.jpg"
    assert info.value.problem == "cannot read image (truncated JPEG)"
    assert "(6, 8)" in "".join(getattr(info.value, "__notes__", []))   # where it ran, for debugging
    assert attempts.read_text() == "x\n"
    assert (6, 8) not in done


def test_an_input_error_in_process_is_raised_as_is(tmp_path):
    with pytest.raises(InputError, match=r"^data/images/train_00006.jpg: cannot read image"):
        run_shards(list(shards(12, 2)), BadFile(str(tmp_path / "a"), (6, 8)), show_progress=False)


def test_a_shard_that_raises_is_retried(client, tmp_path):
    results = _collect([(0, 1), (1, 2)], FailsTwice(str(tmp_path)), compute=client, retries=2)
    assert {s: r for s, (r, _) in results.items()} == {(0, 1): 2, (1, 2): 2}


def test_after_its_retries_a_failing_shard_raises_its_own_exception(client, tmp_path):
    with pytest.raises(Transient) as info:
        run_shards([(0, 1)], FailsTwice(str(tmp_path)), compute=client, retries=1, show_progress=False)
    assert str(info.value) == "shard (0, 1): code 1" and info.value.code == 1


def test_a_shard_whose_worker_dies_is_retried(client, tmp_path):
    marker = tmp_path / "died"
    results = _collect([(1, 2), (2, 3), (3, 4)], DiesOnce(str(marker)), compute=client)
    assert marker.exists()
    assert {s: r for s, (r, _) in results.items()} == {(1, 2): 10, (2, 3): 20, (3, 4): 30}


def test_a_shard_that_kills_every_worker_is_a_worker_lost_error(client):
    def allowed(dask_scheduler, value):
        old, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, value
        return old

    old = client.run_on_scheduler(allowed, value=0)
    try:
        with pytest.raises(WorkerLost, match=r"^doomed: shard \(0, 1\) was running on worker processes that died"):
            run_shards([(0, 1)], always_dies, compute=client, desc="doomed", retries=0, show_progress=False)
    finally:
        client.run_on_scheduler(allowed, value=old)
    client.wait_for_workers(2, timeout=60)


def test_an_error_in_on_result_stops_the_run(client):
    def fail(shard, result):
        raise OSError("cache/pseudolabels.h5.partial: disk full")

    with pytest.raises(OSError, match="disk full"):
        run_shards(list(shards(8, 2)), Rows(0), compute=client, on_result=fail, show_progress=False)


def test_shard_progress_moves_the_local_bar(monkeypatch):
    class Bar:
        n = 0

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    bar = Bar()
    monkeypatch.setattr(compute_mod, "progress", lambda **kwargs: bar)

    def work(shard):
        for _ in range(*shard):
            shard_progress(1)
        assert bar.n == 3 + shard[1]      # 3 resumed, and counted as it went, before the shard returned
        return None

    run_shards(list(shards(10, 4)), work, done=3)
    assert bar.n == 13


def test_a_compute_config_starts_a_cluster_and_sets_up_its_workers():
    """The path a stage takes: a LocalCluster started for the call, one GPU per worker process
    (CUDA_VISIBLE_DEVICES, harmless without one) and torch threads for its share of the cores."""
    config = ComputeConfig(scheduler="dask", workers=2, gpus=2)
    results = _collect(list(shards(16, 1)), worker_environment, compute=config)
    seen = {name: (visible, threads) for (name, visible, threads, pid), _ in results.values()}
    threads = max(1, compute_mod._cpu_count() // 2)
    assert all(seen[name] == (str(name % 2), threads) for name in seen)


# ----------------------------------------------------------------------------- GPUs and SLURM
def test_gpu_for_worker():
    assert gpu_for_worker(0, 0, 2, None) is None                        # no GPUs: left alone
    assert [gpu_for_worker(i, 2, 3, None) for i in range(3)] == ["0", "1", "0"]
    assert gpu_for_worker("transfgu-12-1", 4, 4, "4,5,6,7") == "5"      # SLURM job's 2nd worker
    assert gpu_for_worker("transfgu-12", 1, 1, "3") == "3"              # one worker per job


def test_slurm_cluster_writes_the_job_script():
    compute = ComputeConfig(scheduler="dask", cluster="slurm", retries=3, jobqueue=JobqueueConfig(
        jobs=2, queue="gpu", account="proj42", cores=32, memory="256GiB", gpus_per_job=4, walltime="02:00:00",
        job_extra_directives=["--constraint=a100"], job_script_prologue=["source /shared/transfgu/.venv/bin/activate"]))
    cluster = slurm_cluster(compute)
    try:
        script = cluster.job_script()
        assert cluster.scheduler.allowed_failures == 3
    finally:
        cluster.close()
    for line in ("#SBATCH -J transfgu", "#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH -n 1",
                 "#SBATCH --cpus-per-task=32", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:4",
                 "#SBATCH --constraint=a100", "source /shared/transfgu/.venv/bin/activate"):
        assert line in script.splitlines(), (line, script)
    assert "#SBATCH --mem=256G" in script.splitlines(), script
    assert "--nworkers 4" in script and "--nthreads 1" in script      # one single-threaded worker per GPU
    assert compute_mod.worker_setup(compute) == compute_mod.WorkerSetup(gpus=4, processes=4, torch_threads=8)


# ----------------------------------------------------------------------------- the compute section
def test_compute_defaults_to_in_process():
    assert Config().compute.scheduler == "local"


@pytest.mark.parametrize("override, message", [
    ("compute.schedular=dask", r"unknown key\(s\) in 'compute': 'schedular' \(did you mean 'scheduler'\?\)"),
    ("compute.jobqueue.walltim=1:00:00", r"unknown key\(s\) in 'compute.jobqueue': 'walltim' "
                                         r"\(did you mean 'walltime'\?\)"),
    ("compute.workers=two", r"'compute.workers' must be an integer; got 'two'"),
    ("compute.address=8786", r"'compute.address' must be a string or null; got 8786"),
    ("compute.jobqueue.gpus_per_job=1.5", r"'compute.jobqueue.gpus_per_job' must be an integer; got 1.5"),
    ("compute.jobqueue.memory=64", r"'compute.jobqueue.memory' must be a string; got 64"),
    ("compute.jobqueue.job_extra_directives=--exclusive",
     r"'compute.jobqueue': job_extra_directives must be a list of strings"),
    ("compute.scheduler=ray", r"'compute': scheduler must be one of local, dask; got 'ray'"),
    ("compute.workers=0", r"'compute': workers must be at least 1, got 0"),
])
def test_compute_section_errors_name_the_key(tmp_path, override, message):
    path = tmp_path / "params.yaml"
    path.write_text("compute:\n  scheduler: dask\n")
    with pytest.raises(InputError, match=message):
        load_config(path, [override])


def test_compute_is_no_stage_param():
    """Changing the executor never invalidates an artifact."""
    for stage in STAGES.items():
        stage = stage[1] if isinstance(stage, tuple) else stage
        assert not [p for p in stage.params if p == "compute" or p.startswith("compute.")], stage.name
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    for name, entry in dvc["stages"].items():
        assert not [p for p in entry.get("params", []) if str(p).startswith("compute")], name


def test_an_address_without_a_scheduler_is_an_input_error_naming_it():
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(InputError, match=r"^tcp://127.0.0.1:9: no dask scheduler answers there"):
            with compute_mod.cluster(ComputeConfig(scheduler="dask", address="tcp://127.0.0.1:9")):
                pass


def sum_rows(rows: list[int]) -> int:
    return sum(rows)


def test_shards_may_be_lists_of_rows(client):
    """pseudolabels resumes row by row (its `done` flags), so its shards need not be ranges."""
    todo = [[0, 3, 4], [7], [8, 9]]
    got = {}
    run_shards(todo, sum_rows, compute=client, on_result=lambda s, r: got.__setitem__(tuple(s), r),
               show_progress=False)
    assert got == {(0, 3, 4): 7, (7,): 7, (8, 9): 17}


def test_nothing_to_do_starts_no_cluster(monkeypatch):
    monkeypatch.setattr(compute_mod, "cluster", None)      # would fail if called
    run_shards([], Rows(0), compute=ComputeConfig(scheduler="dask"), done=5, show_progress=False)


def test_a_terminals_ctrl_c_leaves_the_local_workers_to_the_client(client):
    """Ctrl-C in a terminal reaches the whole process group: the workers ignore it (the client
    stops the stage and closes them) rather than each dying with a traceback."""
    before = client.run(os.getpid)
    for pid in before.values():
        os.kill(pid, signal.SIGINT)
    time.sleep(1.0)
    assert client.run(os.getpid) == before       # the same processes: none died and was restarted
