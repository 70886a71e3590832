"""Several processes fail together: when one rank raises or dies, every other rank stops within a minute with
a message naming it, instead of waiting in a collective for the process group's timeout (hours)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(mode: str) -> tuple[list[subprocess.CompletedProcess], float]:
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.ranks", mode], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = [None, None]
    survivor = 1 if mode == "host" else 0
    try:
        stdout, stderr = procs[survivor].communicate(timeout=120)  # without the watchdog: six hours
        seconds = time.monotonic() - t0
        out[survivor] = subprocess.CompletedProcess(procs[survivor].args, procs[survivor].returncode, stdout, stderr)
    finally:
        victim = procs[1 - survivor]
        if mode == "hang":
            victim.kill()  # stopped, it would never exit
        for p in procs:
            if p.poll() is None:
                p.kill()
    stdout, stderr = victim.communicate(timeout=60)
    out[1 - survivor] = subprocess.CompletedProcess(victim.args, victim.returncode, stdout, stderr)
    return out, seconds


@pytest.mark.parametrize("mode, survivor, says", [
    ("raise", 0, "rank 1 failed: ValueError: boom in the level database"),
    ("hang", 0, "rank 1 stopped responding"),
    ("kill", 0, None),  # gloo sees the closed connection first (or the watchdog the silence)
    ("host", 1, "lost contact with rank 0"),
])
def test_every_rank_stops_within_a_minute_when_one_fails(mode, survivor, says):
    (r0, r1), seconds = _two_ranks(mode)
    ranks = (r0, r1)
    victim = ranks[1 - survivor]
    assert victim.returncode != 0
    if mode == "raise":
        assert "ValueError: boom" in victim.stderr
    alive = ranks[survivor]
    assert alive.returncode != 0, alive.stderr[-2000:]
    if says is None:
        assert "remote worker crashing" in alive.stderr or "rank 1 stopped responding" in alive.stderr
    else:
        assert says in alive.stderr, alive.stderr[-2000:]
    assert seconds < 60
