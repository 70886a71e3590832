"""One rank of a two-process group for tests/test_distributed.py: ``python -m tests.ranks MODE``.

MODE ``raise``: rank 1 raises inside the guarded work; ``kill``: rank 1 is killed outright (SIGKILL);
``hang``: rank 1 stops (SIGSTOP: a hung process or an unreachable node, whose connections stay open);
``host``: rank 0, which hosts the store, is killed. The surviving rank waits in a barrier that would
otherwise block for the process group's timeout (hours)."""

import os
import signal
import sys
import time

import torch.distributed as dist

from mixsparse.distributed import from_env, guarded, shutdown


def main(mode: str) -> None:
    workers = from_env(grace=3.0)
    victim = 0 if mode == "host" else 1
    try:
        with guarded(workers):
            if workers.rank == victim:
                time.sleep(1.0)
                if mode == "raise":
                    raise ValueError("boom in the level database")
                os.kill(os.getpid(), signal.SIGSTOP if mode == "hang" else signal.SIGKILL)
            dist.barrier()  # the other rank never arrives
    finally:
        shutdown(workers)


if __name__ == "__main__":
    main(sys.argv[1])
