"""Several processes, one place: rank, world size, process group, rank-0 I/O and local launching.

llmclf runs under PyTorch's own launcher: `torchrun --nproc-per-node N -m llmclf train ...` (one
machine or several, `--nnodes`, c10d rendezvous), or `llmclf train --devices N`, which starts the
same workers through torch's elastic agent (`torch.distributed.launcher.elastic_launch`, what
torchrun calls). Each worker reads RANK / WORLD_SIZE / LOCAL_RANK from the environment the agent
sets, joins the process group (NCCL on CUDA, gloo on CPU) and places itself on `cuda:LOCAL_RANK`
when GPUs are present. Nothing else in llmclf reads these variables.

After a failure the agent restarts every worker (`--max-restarts`); training resumes from its last
state. A restarted group joins under keys of its own generation (`generation_store`), and a worker
that fails records its error for the agent's summary (`recorded`, `record_error`).
"""

from __future__ import annotations

import atexit
import faulthandler
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from llmclf.errors import ConfigError
from llmclf.runtime import resolve_device

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = timedelta(seconds=int(os.environ.get("LLMCLF_DIST_TIMEOUT", 600)))


def launched() -> bool:
    """Whether this process is one worker of several started by torchrun / the elastic agent."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How many times the elastic agent restarted this worker's group after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restarted() -> bool:
    """Whether the elastic agent restarted this worker's group after a failure (then resume)."""
    return restart_count() > 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and draws progress bars."""
    return rank() == 0


def init(device: str | None = None) -> torch.device:
    """This worker's device, after joining the process group when launched as one of several.

    `device` None: `cuda:LOCAL_RANK` when CUDA is present, else the CPU; NCCL for CUDA, gloo for CPU.
    Single process: `resolve_device(device)`, no process group."""
    chosen = resolve_device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was requested but this machine has no CUDA GPU (NCCL needs one); "
                          "leave --device out to run on the CPU (gloo with several processes)")
    if not launched():
        return chosen
    faulthandler.enable()  # a worker that aborts in C++ (SIGABRT, SIGSEGV) still shows its Python stack
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank())
    if chosen.type == "cuda":
        if chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank()} needs cuda:{chosen.index}, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node")
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        store, rank_, world = generation_store()
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=TIMEOUT, store=store,
                                rank=rank_, world_size=world)
        log.debug("rank %d of %d on %s", rank(), world_size(), chosen)
    if not is_main():  # rank 0 speaks for all
        logging.getLogger("llmclf").setLevel(logging.WARNING)
    return chosen


def generation_store() -> tuple[dist.Store, int, int]:
    """(store, rank, world size) for this worker's process group: the launcher's store (MASTER_ADDR:PORT),
    with the keys of this generation of workers under a prefix of their own when that store outlives them.

    With `torchrun --master-port` (static rendezvous) or a c10d rendezvous that shares the agent's store,
    every generation of workers meets in the same store. There, a restarted group's `default_pg` keys were
    still those of the workers the agent had just stopped: gloo read a dead peer's address, and the
    restarted workers failed ("Gloo connectFullMesh failed ... Connection refused") or waited in
    ProcessGroupGloo's connect until the timeout, and with them the run. The restart count names the
    generation: after a failure every agent restarts its workers and counts it. (A c10d rendezvous whose
    nodes come and go restarts without counting: launch such jobs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    which gives every generation a store of its own, as `launch_local` does; then no prefix is needed.)"""
    store, rank_, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.PrefixStore(f"llmclf/generation-{restart_count()}", store)
    return store, rank_, world


def recorded(main: Callable[[], None]) -> Callable[[], None]:
    """`main` as a worker's entry point: under torchrun / the elastic agent, an exception that ends it is
    written to the agent's error file, so the agent's failure summary shows its traceback instead of
    "error_file: <N/A>". The error handler of `torch.distributed.elastic.multiprocessing.errors.record`,
    without `record` itself: its wrapper turns SystemExit(0), how a finished command ends, into a return,
    and the worker would then skip `end_worker`."""
    if not launched():
        return main
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()

    @functools.wraps(main)
    def wrapper() -> None:
        handler.initialize()
        try:
            main()
        except Exception as exc:
            handler.record_exception(exc)
            raise

    return wrapper


def record_error(exc: BaseException) -> None:
    """In a worker: write `exc` (an error llmclf reports in one line and ends on) to the agent's error file,
    for its failure summary. Call from the `except` block that handles it."""
    if launched():
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)


def shutdown() -> None:
    """Leave the process group (at the end of a worker's command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """End a worker whose command has finished, with exit `code`: leave the process group, run
    Python's exit handlers and flush output, then skip the interpreter's finalization with `os._exit`.

    There, the C++ teardown of gloo can abort a worker whose run was complete ("terminate called
    without an active exception", once in CI after `predict --devices 2` had written its output),
    and the launcher then reports the finished job as failed."""
    shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same(what: str, value: Any) -> None:
    """ConfigError on every rank unless all ranks hold the same `value` (compared by checksum).

    Ranks started with different arguments or data would otherwise train different things in lockstep."""
    if not dist.is_initialized():
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests = all_gather(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ConfigError(f"rank(s) {differ} were started with other {what} than rank 0: every process must "
                          "get the same command line and the same files")


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th, from its rank (as DistributedSampler)."""
    return list(items[rank()::world_size()])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: list[str], max_restarts: int = 0) -> None:
    """Run `python -m llmclf ARGV` as `nproc` workers on this machine through torch's elastic agent
    (what torchrun does); with `max_restarts`, a failed worker restarts the whole group. Raises
    `torch.distributed.elastic.multiprocessing.errors.ChildFailedError` when the workers fail."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ConfigError(f"--devices must be at least 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ConfigError(f"--devices {nproc}: this machine has {torch.cuda.device_count()} GPU(s)")
    # Each restart gets a fresh store hosted by rank 0: with the agent's shared rendezvous store, the
    # restarted group could read the dead workers' addresses and fail to connect (pytorch#167288).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          max_restarts=max_restarts, monitor_interval=0.5, start_method="spawn")
    elastic_launch(config, sys.executable)("-m", "llmclf", *argv)
