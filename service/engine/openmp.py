"""llama.cpp's OpenMP worker threads: let them go when the scheduler has nothing to decode.

llama.cpp built with OpenMP (the default on Linux, and how pip builds llama-cpp-python) runs every
decode on a libgomp thread pool owned by the calling thread. After each parallel region the pool's
workers spin, up to GOMP_SPINCOUNT pauses, before they sleep. Between two decode steps that spin is
what keeps the next step from waiting for its workers to wake (`OMP_WAIT_POLICY=PASSIVE`, which
never spins, slows decode). After the last step of a busy period it is pure loss: it holds a core
just when the service's, the adapter's and the client's network stacks deliver the answer
(docs/engine.md, "Idle threads (OpenMP)"; docs/benchmarks.md, "The REST overhead hop by hop").

`omp_pause_resource_all(omp_pause_soft)`, called by the thread that owns the pool, ends its workers
(libgomp joins them); the next decode starts a new pool. The standard OpenMP 5.0 call rather than an
environment variable, because the spin is wanted while sequences decode.

A new pool's workers are new threads, and Linux places a new thread on the CPU running the fewest
tasks: while other work keeps the other cores busy (the adapter's event loop under a flood of
requests, even at a lower priority), that is the scheduler thread's own CPU. The two then take turns
on one core, each spinning at every graph node's barrier while the other cannot run, and the load
balancer leaves them there for as long as they are cache-hot, stretching the whole prefill
(benchmarks/isolation.py measures it; docs/engine.md has the trace). `bind_decode_threads`
has libgomp bind each team's threads one to a CPU when the team spans every CPU the process may use,
so that two decode threads never share one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t in omp.h
# How libgomp places its threads; it reads them once, when it is loaded. An operator who set any of
# them has chosen, and OMP_PROC_BIND=false turns binding off.
_PLACEMENT_VARIABLES = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), not the
    machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def bind_decode_threads(threads: int | None) -> bool:
    """Loads llama.cpp so that each OpenMP team (a scheduler thread and its workers) runs one thread
    per CPU; returns whether binding is on. Must run before llama.cpp is first imported.

    Only where the team of `threads` (None: the default, every usable CPU) spans every CPU the
    process may use: a smaller team bound to the first CPUs would leave the others idle, and another
    process bound the same way would share them. libgomp binds the thread that loads it to the first
    CPU as well; that thread gets its whole mask back, so the threads it starts later (gRPC's, the
    REST adapter's process) run anywhere."""
    if not hasattr(os, "sched_setaffinity") or "llama_cpp" in sys.modules:
        return False
    if any(name in os.environ for name in _PLACEMENT_VARIABLES):
        return False
    mask = os.sched_getaffinity(0)
    if (threads or len(mask)) != len(mask) or len(mask) < 2:
        return False
    os.environ.update(OMP_PROC_BIND="close", OMP_PLACES="threads")
    try:
        import llama_cpp  # noqa: F401 - loads libgomp, which reads the variables now
    finally:
        os.sched_setaffinity(0, mask)
        for name in ("OMP_PROC_BIND", "OMP_PLACES"):
            del os.environ[name]  # read already; child processes start without them
    return True


class WorkerPool:
    """The calling thread's OpenMP pool, if llama.cpp runs on libgomp in this process."""

    def __init__(self) -> None:
        self._pause = None
        try:
            # RTLD_NOLOAD: only the libgomp that llama.cpp already loaded; never a fresh runtime.
            libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        except (OSError, AttributeError):  # not built with OpenMP, or not Linux
            return
        pause = getattr(libgomp, "omp_pause_resource_all", None)  # libgomp >= 9
        if pause is not None:
            pause.argtypes = [ctypes.c_int]
            pause.restype = ctypes.c_int
            self._pause = pause

    @property
    def active(self) -> bool:
        return self._pause is not None

    def release(self) -> None:
        """Ends the idle workers of the calling thread's pool; a no-op if it has none. Must not be
        called from inside a parallel region (llama.cpp never returns from one)."""
        if self._pause is not None and self._pause(_OMP_PAUSE_SOFT) != 0:
            log.warning("omp_pause_resource_all failed; llama.cpp's idle threads will spin after each request")
            self._pause = None
