"""llama-cpp-python's `Llama` on a CPU with AMX: its extra buffer types off, or it dies with SIGILL.

On a CPU with AMX tiles (seen here: an Intel Xeon of model 207 under KVM), llama.cpp as vendored by
llama-cpp-python 0.3.36 puts the weights in its AMX "extra" buffer type, and its AMX matrix kernel
dies with SIGILL on the first prompt (an illegal `tilezero` in an OpenMP worker thread; llama.cpp PR
26954 describes the bug: an invalid tile configuration and per-thread XTILEDATA permission).
`Llama` has no setting for `use_extra_bufts`, so on such a CPU `avoid_amx_extra_buffers` turns it
off in the defaults `Llama` starts from. chatrpc loads every model with extra buffer types off
(service/engine/model.py), so both then run the same kernels; elsewhere `Llama` keeps llama.cpp's
default (repacked weights where the CPU has a kernel for them).
"""

from __future__ import annotations

from pathlib import Path


def cpu_has_amx() -> bool:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def avoid_amx_extra_buffers() -> bool:
    """On a CPU with AMX, make every `llama_cpp.Llama` load its model without extra buffer types;
    whether it did."""
    if not cpu_has_amx():
        return False
    import llama_cpp.llama_cpp as low_level

    defaults = low_level.llama_model_default_params
    if getattr(defaults, "avoids_amx", False):
        return True

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    without_extra_buffer_types.avoids_amx = True
    low_level.llama_model_default_params = without_extra_buffer_types
    return True
