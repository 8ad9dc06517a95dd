"""service/cpu_priority.py on real threads, in a child interpreter: a thread's nice value cannot be
lowered again, so the test must not change its own process's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import os, threading
    from service.cpu_priority import lower_all_threads_but

    def nice(tid=None):
        return os.getpriority(os.PRIO_PROCESS, tid or threading.get_native_id())

    started, stop, seen = threading.Event(), threading.Event(), {}

    def decode():
        seen["decode"] = threading.get_native_id()
        started.set()
        stop.wait()
        seen["decode nice"] = nice()
        # A thread that the decoding one starts later (llama.cpp's OpenMP workers) keeps its priority.
        worker = threading.Thread(target=lambda: seen.setdefault("worker", nice()))
        worker.start()
        worker.join()

    decoder = threading.Thread(target=decode)
    decoder.start()
    started.wait()
    base = nice()
    changed = lower_all_threads_but({seen["decode"]}, base + 7)
    later = threading.Thread(target=lambda: seen.setdefault("later", nice()))
    later.start()
    later.join()
    stop.set()
    decoder.join()
    print(base, changed, seen["decode nice"] - base, nice() - base, seen["later"] - base, seen["worker"] - base)
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads have no priority of their own here")
def test_every_thread_but_the_decoding_ones_is_lowered_and_the_threads_they_start_inherit_it():
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    base, changed, decode, main, later, worker = map(int, result.stdout.split())
    if base + 7 > 19:
        pytest.skip("this process already runs at the lowest priority")
    assert changed >= 1  # the main thread at least
    assert (decode, worker) == (0, 0)  # the decoding thread and what it starts keep the process's priority
    assert (main, later) == (7, 7)  # every other thread, and the threads it starts, are lowered
