"""Several processes (e.g. one per GPU, started by ``torchrun``) sharing one MSP search.

Every rank loads the model, builds the same level cache and runs the same seeded search; only the
fitness evaluations are dealt out (:meth:`mixsparse.search.Fitness.prefetch`) and their scores
all-gathered, so all ranks follow one trajectory and rank 0 writes the outputs. Nothing here runs
unless ``WORLD_SIZE`` > 1.

Ranks fail together: a collective waits up to the process group's timeout (hours, since the others wait
while rank 0 builds a level database), so a :class:`Watchdog` thread on every rank beats a counter in the
group's key-value store and reads the others'. A rank whose work raises posts its error there
(:func:`guarded`); a rank killed outright stops beating. Every other rank then stops within seconds (a
posted error) or ``grace`` seconds (silence) with a message naming the rank and its error.
Per-rank memory is bounded by streaming the model from its checkpoint (``model.stream``): each rank holds
one or two blocks, and the level database of a streamed model (or a reconstructing pruner) is built once, by
rank 0, in the run's cache.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import ConfigError, MixsparseError

log = logging.getLogger(__name__)


class RankFailed(MixsparseError):
    """Another rank of the process group failed or vanished; this one stops too."""


_KEY = "mixsparse/"


class Watchdog:
    """Heartbeats and failure notices between the ranks through the group's store (see the module docstring)."""

    def __init__(self, store, rank: int, world: int, interval: float = 1.0, grace: float = 30.0,
                 exit_after: float = 10.0):
        self.store, self.rank, self.world = store, rank, world
        self.interval, self.grace, self.exit_after = interval, grace, exit_after
        self._stop = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last beat count, when it last changed)
        self._main = threading.main_thread().ident
        self.message: str | None = None
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            # the main thread leaves a blocked collective only by an exception raised from a signal handler,
            # or not at all (then the process exits, see _abort)
            self._previous_handler = signal.signal(signal.SIGUSR1, self._raise)
        self._thread = threading.Thread(target=self._loop, name="mixsparse-watchdog", daemon=True)
        self._thread.start()

    def _raise(self, signum, frame):
        raise RankFailed(self.message or "another rank failed")

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed (called by :func:`guarded`; best effort)."""
        text = f"rank {self.rank} failed: {type(error).__name__}: {error}".splitlines()[0][:500]
        with contextlib.suppress(Exception):
            self.store.set(_KEY + "failed", text)
        self._stop.set()  # its own notice is not news to this rank

    def posted(self, wait: float = 0.0) -> str | None:
        """Another rank's posted failure, if any (polled for up to ``wait`` seconds)."""
        end = time.monotonic() + wait
        while True:
            with contextlib.suppress(Exception):
                if self.store.check([_KEY + "failed"]):
                    text = self.store.get(_KEY + "failed").decode()
                    if not text.startswith(f"rank {self.rank} "):
                        return text
            if time.monotonic() >= end:
                return None
            time.sleep(0.2)

    def stop(self) -> None:
        """This rank is done: the others no longer expect its heartbeat."""
        with contextlib.suppress(Exception):
            self.store.set(_KEY + f"done/{self.rank}", "1")
        self._stop.set()
        self._thread.join(timeout=5)
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)

    def _problem(self) -> str | None:
        self.store.add(_KEY + f"beat/{self.rank}", 1)
        if self.store.check([_KEY + "failed"]):
            return self.store.get(_KEY + "failed").decode()
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank or self.store.check([_KEY + f"done/{r}"]):
                continue
            beats = self.store.add(_KEY + f"beat/{r}", 0)
            last, since = self._seen.get(r, (-1, now))
            if beats != last:
                self._seen[r] = (beats, now)
            elif now - since > self.grace:
                return f"rank {r} stopped responding (no heartbeat for {self.grace:.0f} s: killed, out of memory, or hung)"
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                problem = self._problem()
            except Exception as e:  # noqa: BLE001 - the store lives in rank 0: it is gone
                if self._stop.is_set():
                    return
                problem = f"lost contact with rank 0, which hosts the group's store ({type(e).__name__}: {e})"
            if problem is not None and not self._stop.is_set():
                self._abort(problem)
                return

    def _abort(self, problem: str) -> None:
        self.message = f"rank {self.rank} stops because {problem}"
        log.error(self.message)
        print(f"mixsparse: {self.message}", file=sys.stderr, flush=True)
        signal.pthread_kill(self._main, signal.SIGUSR1)  # raises RankFailed in the main thread's Python code
        if not self._stop.wait(self.exit_after):  # still inside a collective that never returns
            print(f"mixsparse: rank {self.rank} exits (its main thread is blocked in a collective)", file=sys.stderr,
                  flush=True)
            os._exit(1)


@dataclass(frozen=True)
class Workers:
    rank: int
    world: int
    device: torch.device | None  # this rank's GPU (None: keep the configured device)
    group: object  # the torch.distributed process group
    watchdog: Watchdog | None = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def share_flag(workers: Workers, flag: bool | None) -> bool:
    """Rank 0's ``flag``, on every rank (the others pass None and wait for it)."""
    import torch.distributed as dist

    obj = [flag]
    dist.broadcast_object_list(obj, src=0, group=workers.group)
    return bool(obj[0])


def from_env(grace: float = 30.0) -> Workers | None:
    """Join the process group described by torchrun's environment variables, or return None for a
    single process. NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is present, else gloo. ``grace``:
    seconds of silence after which a rank counts as dead."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        raise ConfigError("WORLD_SIZE > 1 but no MASTER_ADDR: start several processes with torchrun, e.g. "
                          "torchrun --standalone --nproc_per_node=4 -m mixsparse search ...")
    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    watchdog = None
    if not dist.is_initialized():
        # generous timeout: non-main ranks wait while rank 0 builds a SparseGPT level database (many minutes); a
        # rank that fails is noticed by the watchdog instead (within a minute)
        rank = int(os.environ["RANK"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun hosts the store
        store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent, timeout=datetime.timedelta(minutes=10))
        dist.init_process_group("nccl" if device is not None else "gloo", store=dist.PrefixStore("pg", store),
                                rank=rank, world_size=world, timeout=datetime.timedelta(hours=6))
        watchdog = Watchdog(dist.PrefixStore("watchdog", store), rank, world, grace=grace)
    return Workers(dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD, watchdog)


@contextlib.contextmanager
def guarded(workers: "Workers | None") -> Iterator[None]:
    """The ranks' shared work: an error here is posted to the other ranks (which then stop too) and raised."""
    try:
        yield
    except RankFailed:
        raise
    except BaseException as e:
        dog = workers.watchdog if workers is not None else None
        if dog is None:
            raise
        # a collective that failed because a peer died: say which rank failed first and why, not only gloo's
        # "connection closed" (the peer posted its error before its connections closed)
        peer = isinstance(e, RuntimeError) and ("peer" in str(e).lower() or "connection" in str(e).lower())
        other = dog.posted(wait=3.0 if peer else 0.0)
        if other is not None:
            raise RankFailed(f"rank {dog.rank} stops because {other}") from e
        dog.fail(e)
        raise


def shutdown(workers: Workers | None) -> None:
    if workers is not None:
        import torch.distributed as dist

        if workers.watchdog is not None:
            workers.watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
