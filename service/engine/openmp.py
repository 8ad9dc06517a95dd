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
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t in omp.h


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
