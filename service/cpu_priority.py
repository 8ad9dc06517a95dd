"""Decode first: the service's request handling runs at a lower CPU priority than its decode threads.

llama.cpp's threads fill the cores (the default --threads is all of them), and they meet at the end
of every graph node: anything else that runs preempts one of them and the others wait for it. So a
few milliseconds of request handling (receiving a large message, rendering a template, tokenizing,
compiling a grammar, the REST adapter parsing JSON) stretch a running step many times over, and
every sequence in the batch pays (benchmarks/isolation.py measures it).

Linux schedules threads, each with its own nice value, and a new thread starts with its creator's.
Once the models are loaded and their schedulers' threads run at the process's priority, every other
thread of the process is set to `niceness`: the threads that gRPC, the event loop's executors and
`chatrpc serve`'s REST adapter process start later inherit it from them, while the OpenMP workers
that llama.cpp starts from a scheduler's thread inherit the scheduler's. Request handling still gets
the CPU whenever decode leaves it (between steps, and while nothing decodes); it only stops taking it
from a running step. Unprivileged processes can raise their nice value but never lower it again,
which is why this happens once, after the schedulers have started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)

_TASKS = Path("/proc/self/task")


def lower_all_threads_but(decode_threads: Collection[int], niceness: int) -> int:
    """Sets every thread of this process except `decode_threads` (native ids) to at least
    `niceness`; returns how many were changed. A no-op where threads have no priority of their own
    (not Linux) or `niceness` is 0."""
    if niceness <= 0 or not _TASKS.is_dir():
        return 0
    changed = 0
    for task in _TASKS.iterdir():
        tid = int(task.name)
        if tid in decode_threads:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
        except (ProcessLookupError, PermissionError) as error:  # the thread ended meanwhile; or a sandbox
            log.debug("could not lower thread %d's priority: %s", tid, error)
    return changed
