"""The REST adapter's worker processes for large bodies (adapters/rest/body.py) end with it.

The adapter runs alone (`chatrpc rest`, its upstream a port where nothing listens): its workers
start with the app. Whether the adapter is stopped or killed, none of its child processes may be
left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatrpc.local_server import free_port

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(status.parent.name))
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_workers_end_with_the_adapter(stop):
    command = [
        sys.executable, "-m", "chatrpc", "rest", "--port", str(free_port()),
        "--upstream", f"127.0.0.1:{free_port()}", "--log-level", "warning",
    ]  # fmt: skip
    adapter = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline:  # the pool's workers (and its tracker)
            workers = _children(adapter.pid)
            time.sleep(0.2)
        assert len(workers) >= 2, "the adapter started no workers"
        adapter.send_signal(stop)
        adapter.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(workers), f"left behind: {_alive(workers)}"
    finally:
        if adapter.poll() is None:
            adapter.kill()
            adapter.wait()
