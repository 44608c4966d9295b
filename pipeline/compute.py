"""Where per-image shards run: in this process, in order (`compute.scheduler: local`), or as
tasks on a dask.distributed cluster (`dask`): a LocalCluster of worker processes, an existing
scheduler (`compute.address`), or SLURM jobs through dask-jobqueue (`compute.cluster: slurm`).

A stage hands :func:`run_shards` its shards (``(start, stop)`` ranges of manifest rows) and a
picklable ``work(shard)``; results come back to the calling process, where
``on_result(shard, result)`` does the single-writer part (HDF5 rows, shard logs). Workers
build expensive objects such as the backbone once per process with :func:`worker_cached`.

The executor never changes an artifact: no stage lists `compute` as a DVC param, and the
results are those of the in-process run (tests/test_compute.py).
"""
from __future__ import annotations

import contextlib
import logging
import numbers
import os
import pickle
import threading
import traceback
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

from pipeline.config import ComputeConfig
from pipeline.errors import InputError, ProvenanceError
from pipeline.runtime import log, progress

if TYPE_CHECKING:  # distributed is imported only when a dask scheduler is asked for
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from pipeline.data import Manifest

S = TypeVar("S")
R = TypeVar("R")

# Errors about the inputs give the same answer on every attempt: they are not retried.
NOT_RETRIED: tuple[type[BaseException], ...] = (InputError, ProvenanceError)


class WorkerLost(RuntimeError):
    """A shard's worker process died (out of memory, a crash) more often than `compute.retries`."""


# ----------------------------------------------------------------------------- per-worker objects
_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[Hashable, threading.Lock] = {}


def worker_cached(key: Hashable, factory: Callable[[], R]) -> R:
    """The object ``factory()`` built once per process for ``key`` and reused afterwards.

    In a dask worker this makes the backbone load once per worker process, not once per
    shard; in the local scheduler the calling process is the worker, so a stage that builds
    its backbone through the same key shares it with its `work`. Long-lived workers (an
    existing cluster) keep their objects across runs, so the key must name everything the
    object depends on (backbone name, weights id, device), never only a path.

    Args:
        key: hashable identity of the object.
        factory: builds it; called at most once per process and key (threads wait for the
            first call), again only after it raised.

    Returns:
        The cached object.
    """
    try:
        return _CACHE[key]
    except KeyError:
        pass
    with _CACHE_LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            _CACHE[key] = factory()
        return _CACHE[key]


def cached_manifest(path: str, project_dir: str | None) -> "Manifest":
    """The manifest at `path`, loaded once per worker process, and again when the file changes (the
    workers of an existing cluster outlive a run); `project_dir` resolves its relative data root."""
    from pathlib import Path

    from pipeline.data import Manifest

    return worker_cached(("manifest", path, project_dir, Path(path).stat().st_mtime_ns),
                         lambda: Manifest.load(path, project_dir=project_dir))


@dataclass(kw_only=True)
class StageShards:
    """Base of a per-image stage's picklable ``work``: it reaches the manifest and the backbone.

    Pickled to dask workers small (paths and the backbone's config): each worker process loads
    the manifest and builds the backbone once (worker_cached), and checks that it loads the
    weights the run started with. In the stage's own process the objects the stage already
    holds are used as they are (they are not pickled).
    """

    manifest_path: str | None
    project_dir: str | None
    backbone_config: Any                # pipeline.config.BackboneConfig
    weights_id: str
    # what the stage asked for ("auto", "cuda", a resolved "cuda:0"), resolved by each process
    # that computes: a dask client on a login node without a GPU must not decide for its workers
    device: str
    manifest: Any = None                # pipeline.data.Manifest, in the stage's own process
    backbone: Any = None                # pipeline.backbones.Backbone, likewise

    def __getstate__(self) -> dict:
        if self.manifest_path is None or self.backbone_config is None:
            raise ValueError(f"{type(self).__name__} on dask workers needs the manifest's path and the backbone's config")
        return {**self.__dict__, "manifest": None, "backbone": None}

    def inputs(self) -> tuple[Any, Any, Any]:
        """(manifest, backbone on its device, torch device) for this process."""
        from pipeline.backbones import backbone_from_config
        from pipeline.runtime import resolve_device

        device = resolve_device(self.device)
        manifest = self.manifest or cached_manifest(self.manifest_path, self.project_dir)
        backbone = self.backbone or worker_cached(
            ("backbone", self.backbone_config.name, self.weights_id, str(device)),
            lambda: backbone_from_config(self.backbone_config).to(device).eval())
        if backbone.weights_id != self.weights_id:
            raise ProvenanceError(f"{self.backbone_config.weights or self.backbone_config.name}: this worker loads "
                                  f"weights {backbone.weights_id}, the run started with {self.weights_id}")
        return manifest, backbone, device


def shard_inputs(manifest: Any, backbone: Any, backbone_config: Any, device: Any,
                 compute: "ComputeConfig | Client | None") -> dict:
    """The StageShards fields of a stage holding `manifest` (loaded from a file) and `backbone`.

    When the shards run in this process (runs_in_process(compute)) the backbone goes to its
    device now; for a dask run it stays where it is and `device` is resolved by each worker."""
    from pathlib import Path

    if runs_in_process(compute):
        from pipeline.runtime import resolve_device

        backbone.to(resolve_device(str(device))).eval()
    return {"manifest_path": str(Path(manifest.path).resolve()) if manifest.path else None,
            "project_dir": str(manifest.project_dir or Path.cwd()), "backbone_config": backbone_config,
            "weights_id": backbone.weights_id, "device": str(device), "manifest": manifest, "backbone": backbone}


def clear_worker_cache(key: Hashable | None = None) -> None:
    """Forget the object of ``key`` (every object when None) in this process."""
    with _CACHE_LOCK:
        if key is None:
            _CACHE.clear()
        else:
            _CACHE.pop(key, None)


# ----------------------------------------------------------------------------- progress inside a shard
# The bar of the local run_shards in progress (innermost last) and what shard_progress
# counted of the current shard (from any thread of this process).
_local_bars: list[Any] = []
_local_reported: list[int] = []


def shard_progress(n: int) -> None:
    """Count ``n`` items of the running shard as done now, from inside ``work``.

    Under the local scheduler the stage's bar moves batch by batch as it did before shards
    were delegated; on a dask worker this does nothing (the bar moves when a shard returns).
    """
    if _local_bars:
        _local_bars[-1].update(n)
        _local_reported[-1] += n


# ----------------------------------------------------------------------------- run_shards
def runs_in_process(compute: "ComputeConfig | Client | None") -> bool:
    """Whether run_shards runs the shards in this process (None, or the local scheduler) rather
    than on a dask cluster (a dask ComputeConfig or a connected Client)."""
    return compute is None or (isinstance(compute, ComputeConfig) and compute.scheduler == "local")


def run_shards(shards: Iterable[S], work: Callable[[S], R], *,
               compute: "ComputeConfig | Client | None" = None,
               on_result: Callable[[S, R], None] | None = None,
               desc: str = "shards", unit: str = "img", size: Callable[[S], int] | None = None,
               total: int | None = None, done: int = 0, retries: int | None = None,
               show_progress: bool = True) -> None:
    """``work(shard)`` for every shard, in this process or on a dask cluster, with
    ``on_result(shard, result)`` called in this process as each shard completes.

    Local (`compute.scheduler: local`, or ``compute=None``): in order, in this process.
    Dask: every shard is a task (``pure=False``, retried up to ``retries`` times when it
    raises; a worker death is retried by the scheduler of a cluster started here); results
    arrive in completion order. The first failure cancels the shards not yet finished, and
    the shards already passed to ``on_result`` stay done, so a stage that marks them resumes.

    ``work`` must pickle small: a module-level function or a dataclass instance holding paths
    and config sections, not a model or arrays; heavy objects are built on the worker with
    :func:`worker_cached`. Its exceptions reach the caller with their own type and message (an
    InputError stays an InputError naming the file), with the worker's traceback as a note;
    InputError and ProvenanceError are not retried (a bad file stays bad).

    Args:
        shards: picklable work items, usually ``(start, stop)`` row ranges.
        work: picklable callable, ``work(shard) -> result`` (result picklable under dask).
        compute: a ComputeConfig (a dask cluster is started or connected to for this call and
            closed after it), a connected ``distributed.Client`` to use as is, or None (local).
        on_result: called in this process with each shard and its result; the place for
            single-writer work. Its exceptions stop the run like a shard's.
        desc: name on the progress bar, in task keys and in error messages.
        unit: unit of the progress bar.
        size: items in a shard, for the progress bar; default ``stop - start`` for a
            ``(start, stop)`` pair, else its length (a list of rows), else 1.
        total: the bar's total; default ``done`` + the items of ``shards``.
        done: items already done before this call (resumed), counted at the start.
        retries: attempts after the first for a shard that raises; default ``compute.retries``
            (2 when ``compute`` is a Client).
        show_progress: False for a silent run.
    """
    shards = list(shards)
    size = size or _shard_size
    sizes = [size(s) for s in shards]
    total = done + sum(sizes) if total is None else total
    # no shard left (a resumed run): no cluster is started for nothing
    if not shards or runs_in_process(compute):
        with _bar(total, done, desc, unit, show_progress) as bar:
            _run_local(shards, sizes, work, on_result, bar)
        return
    if isinstance(compute, ComputeConfig):
        retries = compute.retries if retries is None else retries
        with cluster(compute) as client, _bar(total, done, desc, unit, show_progress) as bar:
            _run_dask(client, shards, sizes, _Task(work, worker_setup(compute)), on_result, bar, desc, retries)
        return
    with _bar(total, done, desc, unit, show_progress) as bar:
        _run_dask(compute, shards, sizes, _Task(work), on_result, bar, desc,
                  ComputeConfig().retries if retries is None else retries)


def _is_range(shard: Any) -> bool:
    return isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(v, numbers.Integral) for v in shard)


def _shard_size(shard: Any) -> int:
    if _is_range(shard):
        return int(shard[1] - shard[0])
    return len(shard) if hasattr(shard, "__len__") else 1


@contextlib.contextmanager
def _bar(total: int, done: int, desc: str, unit: str, enabled: bool) -> Iterator[Any]:
    with progress(total=total, desc=desc, unit=unit, enabled=enabled) as bar:
        if done:
            bar.update(done)
        yield bar


def _run_local(shards: Sequence[S], sizes: Sequence[int], work: Callable[[S], R],
               on_result: Callable[[S, R], None] | None, bar: Any) -> None:
    _local_bars.append(bar)
    _local_reported.append(0)
    try:
        for shard, n in zip(shards, sizes):
            _local_reported[-1] = 0
            result = work(shard)
            if on_result is not None:
                on_result(shard, result)
            bar.update(max(0, n - _local_reported[-1]))     # what shard_progress did not count yet
    finally:
        _local_bars.pop()
        _local_reported.pop()


def _run_dask(client: "Client", shards: Sequence[S], sizes: Sequence[int], task: "_Task",
              on_result: Callable[[S, R], None] | None, bar: Any, desc: str, retries: int) -> None:
    from distributed import as_completed

    if not shards:
        return
    token = uuid.uuid4().hex[:8]
    # readable keys (the dashboard, the worker logs): desc-start-stop-run
    keys = [f"{desc}-{shard[0]}-{shard[1]}-{token}" if _is_range(shard) else f"{desc}-#{i}-{token}"
            for i, shard in enumerate(shards)]
    futures = client.map(task, shards, key=keys, pure=False, retries=retries)
    pending = {f.key: (shard, n) for f, shard, n in zip(futures, shards, sizes)}
    try:
        for future in as_completed(futures):
            shard, n = pending.pop(future.key)
            if future.status == "error":
                raise _client_side(future.exception(), shard, desc, retries)
            result = future.result()
            future.release()      # the worker may drop the result now
            if isinstance(result, _Failed):
                raise result.error.rebuild(shard, desc)
            if on_result is not None:
                on_result(shard, result)
            bar.update(n)
    finally:
        left = [f for f in futures if f.key in pending]
        if left:
            client.cancel(left)


# ----------------------------------------------------------------------------- errors across processes
@dataclass
class _Recipe:
    """An exception whose __init__ does not take its own args (InputError(path, problem) has
    args == (message,)), rebuilt without calling __init__."""
    cls: type
    args: tuple
    state: dict

    def build(self) -> BaseException:
        exc = self.cls.__new__(self.cls, *self.args)
        exc.args = self.args
        exc.__dict__.update(self.state)
        return exc


@dataclass
class _PortableError:
    """A worker's exception in a form that pickles, with the text to fall back on."""
    payload: bytes | None       # the pickled exception, or its _Recipe
    type_name: str
    message: str
    traceback: str
    worker: str

    @classmethod
    def of(cls, exc: BaseException) -> "_PortableError":
        payload = None
        for candidate in (exc, _Recipe(type(exc), exc.args, dict(getattr(exc, "__dict__", {})))):
            try:
                data = pickle.dumps(candidate)
                rebuilt = pickle.loads(data)
                if isinstance(rebuilt, _Recipe):
                    rebuilt = rebuilt.build()
                if type(rebuilt) is type(exc) and str(rebuilt) == str(exc):
                    payload = data
                    break
            except Exception:  # noqa: BLE001 - not portable this way: try the next, else text only
                continue
        return cls(payload, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc),
                   "".join(traceback.format_exception(exc)), _worker_address())

    def rebuild(self, shard: Any, desc: str) -> BaseException:
        """The exception as raised on the worker (its type and message), noting where."""
        exc: BaseException | None = None
        if self.payload is not None:
            try:
                exc = pickle.loads(self.payload)
                if isinstance(exc, _Recipe):
                    exc = exc.build()
            except Exception:  # noqa: BLE001 - the class is not importable here: the text below
                exc = None
        if exc is None:
            exc = RuntimeError(f"{self.type_name}: {self.message}")
        _note(exc, f"{desc}: raised by shard {shard} on dask worker {self.worker}; its traceback:\n"
                   f"{self.traceback.rstrip()}")
        return exc


def _note(exc: BaseException, text: str) -> None:
    """exc.add_note (Python 3.11+: shown under the traceback); the same list on 3.10."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), text]


class _ShardError(Exception):
    """Raised on the worker for an exception that may pass on a retry; carries it portably."""

    def __init__(self, error: _PortableError) -> None:
        super().__init__(error)
        self.error = error

    def __str__(self) -> str:     # what the worker's log shows
        return f"{self.error.type_name}: {self.error.message}"

    __repr__ = __str__


@dataclass
class _Failed:
    """Returned (not raised, so the scheduler does not retry) for an error in NOT_RETRIED."""
    error: _PortableError


@dataclass(frozen=True)
class _Task:
    """``work`` wrapped so that its exceptions reach the client intact (InputError does not
    unpickle by itself: its __init__ takes (path, problem), its args hold the message)."""
    work: Callable[[Any], Any]
    setup: "WorkerSetup | None" = None

    def __call__(self, shard: Any) -> Any:
        if self.setup is not None:
            _set_up_worker(self.setup)
        try:
            return self.work(shard)
        except NOT_RETRIED as exc:
            return _Failed(_PortableError.of(exc))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the client
            raise _ShardError(_PortableError.of(exc)) from None


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001 - not on a worker
        return f"pid {os.getpid()}"


def _client_side(exc: BaseException, shard: Any, desc: str, retries: int) -> BaseException:
    """The exception a failed future stands for, as the caller should see it."""
    from distributed import KilledWorker

    if isinstance(exc, _ShardError):
        return exc.error.rebuild(shard, desc)
    if isinstance(exc, KilledWorker):
        lost = WorkerLost(f"{desc}: shard {shard} was running on worker processes that died "
                          f"({retries + 1} times, compute.retries = {retries}): out of memory or a crash? "
                          f"see the worker logs")
        lost.__cause__ = exc
        return lost
    _note(exc, f"{desc}: shard {shard}")
    return exc


# ----------------------------------------------------------------------------- clusters
@contextlib.contextmanager
def cluster(compute: ComputeConfig) -> Iterator["Client"]:
    """A dask Client for ``compute``: connected to ``compute.address``, or to a LocalCluster
    of ``compute.workers`` processes, or to a SLURM cluster of ``compute.jobqueue.jobs`` jobs.

    What it started (the cluster and its workers or jobs) is closed on exit; an existing
    scheduler and its workers are left running.

    Args:
        compute: the `compute` section.

    Returns:
        A context manager yielding the connected ``distributed.Client``.
    """
    from distributed import Client

    if compute.address:
        try:
            client = Client(compute.address)
        except OSError as exc:
            raise InputError(compute.address, f"no dask scheduler answers there (compute.address): {exc}") from None
        with client:
            log(f"compute: dask scheduler {compute.address}, {len(client.scheduler_info()['workers'])} worker(s) now")
            yield client
        return
    started = slurm_cluster(compute) if compute.cluster == "slurm" else local_cluster(compute)
    logger = logging.getLogger("distributed")
    level = logger.level
    try:
        with Client(started) as client:
            if compute.cluster == "slurm":
                started.scale(jobs=compute.jobqueue.jobs)
                log(f"compute: asked SLURM for {compute.jobqueue.jobs} job(s) of {_slurm_processes(compute)} "
                    f"worker(s); shards start as workers join (dashboard {started.dashboard_link})")
            else:
                log(f"compute: local dask cluster of {compute.workers} worker process(es) "
                    f"(dashboard {started.dashboard_link})")
            yield client
    except KeyboardInterrupt:
        # the closing cluster's own warnings (workers busy in a shard are killed after a few
        # seconds: "Worker process still alive ..., killing") are not shown: the stage's one
        # message says what was kept
        logger.setLevel(logging.ERROR)
        raise
    finally:
        started.close()
        logger.setLevel(level)


def local_cluster(compute: ComputeConfig) -> Any:
    """A distributed.LocalCluster of ``compute.workers`` processes on this machine (not yet connected).

    The scheduler gives a shard whose worker died ``compute.retries`` more attempts; its
    dashboard takes a free port (several users on one machine), logged by :func:`cluster`.
    """
    from distributed import LocalCluster

    return LocalCluster(n_workers=compute.workers, processes=True, threads_per_worker=compute.threads_per_worker,
                        scheduler_kwargs={"allowed_failures": compute.retries}, dashboard_address=":0",
                        preload=[__name__])      # dask_setup below, in every worker process


def dask_setup(worker: Any) -> None:
    """Run by each local worker process as it starts (a dask preload: local_cluster).

    A terminal's Ctrl-C reaches every process of its group, the workers included: they leave it
    to the client, which stops the stage and closes them, instead of each printing a
    KeyboardInterrupt traceback. And the warning a worker logs for each task its closing
    cancels ("Async instruction ... ended with CancelledError", the only warning that logger
    has) is dropped.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


def _slurm_processes(compute: ComputeConfig) -> int:
    return compute.jobqueue.gpus_per_job or compute.jobqueue.processes


def slurm_cluster(compute: ComputeConfig) -> "SLURMCluster":
    """A dask_jobqueue.SLURMCluster for ``compute.jobqueue``, with no job submitted yet
    (``cluster.job_script()`` shows the batch script; :func:`cluster` scales it).

    Each job asks for ``gpus_per_job`` GPUs (``--gres=gpu:N``) and runs that many worker
    processes (one per GPU; :class:`WorkerSetup` pins each to its own) of
    ``threads_per_worker`` threads; ``cores`` and ``memory`` are the job's, shared by its workers.

    Args:
        compute: the `compute` section.

    Returns:
        The SLURMCluster (its scheduler runs in this process).
    """
    from dask_jobqueue import SLURMCluster

    jq = compute.jobqueue
    processes = _slurm_processes(compute)
    directives = ([f"--gres=gpu:{jq.gpus_per_job}"] if jq.gpus_per_job else []) + list(jq.job_extra_directives)
    optional = {name: getattr(jq, name) for name in ("queue", "account", "python", "interface", "log_directory")
                if getattr(jq, name) is not None}
    # `cores` of dask-jobqueue is the job's dask threads (processes x threads); the cores the job
    # gets from SLURM (--cpus-per-task) are job_cpu, the rest being the torch threads of its
    # workers. The dashboard takes a free port: a login node is shared.
    return SLURMCluster(cores=processes * compute.threads_per_worker, job_cpu=jq.cores, processes=processes,
                        memory=jq.memory, walltime=jq.walltime, job_name="transfgu",
                        job_extra_directives=directives, job_script_prologue=list(jq.job_script_prologue),
                        scheduler_options={"allowed_failures": compute.retries, "dashboard_address": ":0"},
                        **optional)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _threads(cores: int, tasks: int) -> int:
    return max(1, cores // max(1, tasks))


def gpu_for_worker(name: Any, gpus: int, processes: int, visible: str | None) -> str | None:
    """The CUDA device a worker process gets: worker i of a LocalCluster (name i) or of a job
    (name ``<job>-i`` when the job runs several) takes GPU i mod ``gpus`` of those visible.

    Args:
        name: the dask worker's name.
        gpus: GPUs to spread the workers over; 0 = no pinning.
        processes: worker processes per machine or job (1: the name carries no index).
        visible: CUDA_VISIBLE_DEVICES of the machine or job (SLURM sets it), None = 0..gpus-1.

    Returns:
        The value for the worker's CUDA_VISIBLE_DEVICES, or None to leave it as it is.
    """
    if gpus <= 0:
        return None
    if isinstance(name, int):
        index = name
    elif processes > 1 and str(name).rpartition("-")[2].isdigit():
        index = int(str(name).rpartition("-")[2])
    else:
        index = 0
    devices = [d.strip() for d in visible.split(",") if d.strip()][:gpus] if visible else [str(i) for i in range(gpus)]
    return devices[index % len(devices)] if devices else None


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker process of a cluster started here is set up before its first shard: one
    GPU per worker process (CUDA_VISIBLE_DEVICES, set before CUDA is initialised there) and
    torch threads for its share of the cores (dask's nanny starts workers with OMP_NUM_THREADS=1)."""
    gpus: int
    processes: int
    torch_threads: int

    def apply(self, worker_name: Any) -> None:
        """Set this process up as worker ``worker_name``."""
        all_visible = os.environ.setdefault("TRANSFGU_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        device = gpu_for_worker(worker_name, self.gpus, self.processes, all_visible or None)
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(self.torch_threads)
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(self.torch_threads)


def worker_setup(compute: ComputeConfig) -> WorkerSetup | None:
    """The set-up of the workers of the cluster :func:`cluster` starts for ``compute``; None
    for an existing scheduler (its workers are configured by whoever started them)."""
    if compute.address:
        return None
    if compute.cluster == "slurm":
        processes = _slurm_processes(compute)
        return WorkerSetup(gpus=compute.jobqueue.gpus_per_job, processes=processes,
                           torch_threads=_threads(compute.jobqueue.cores, processes * compute.threads_per_worker))
    if compute.torch_threads:
        threads = compute.torch_threads
    elif compute.gpus:
        threads = _threads(_cpu_count(), compute.workers * compute.threads_per_worker)
    else:
        # CPU workers compute with as many torch threads as the stage's own process would: CPU
        # kernels sum in an order that depends on the thread count, and the same count is what
        # makes a dask run's arrays those of the in-process run, bit for bit (so DVC sees no
        # change). More threads than cores in all; compute.torch_threads trades that for speed.
        import torch

        threads = torch.get_num_threads()
    return WorkerSetup(gpus=compute.gpus, processes=compute.workers, torch_threads=threads)


_applied_setup: list[WorkerSetup] = []


def _set_up_worker(setup: WorkerSetup) -> None:
    """``setup`` applied once per worker process (again only for another set-up)."""
    with _CACHE_LOCK:
        if _applied_setup and _applied_setup[0] == setup:
            return
        from distributed import get_worker

        setup.apply(get_worker().name)
        _applied_setup[:] = [setup]
