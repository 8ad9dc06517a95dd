"""llama-cpp-python's own server (the serving benchmark's peer), runnable on CPUs with AMX.

    .venv/bin/python benchmarks/llama_cpp_peer.py --model PATH --chat_format gemma ...   # the server's own flags

On a CPU with AMX tiles (seen here: an Intel Xeon of model 207 under KVM), llama.cpp as vendored by
llama-cpp-python 0.3.36 puts the weights in its AMX "extra" buffer type, and its AMX matrix kernel
dies with SIGILL on the first prompt (an illegal `tilezero` in an OpenMP worker thread; llama.cpp PR
26954 describes the bug: an invalid tile configuration and per-thread XTILEDATA permission).
llama-cpp-python has no setting for `use_extra_bufts`, so on such a CPU this turns it off in the
defaults its `Llama` class starts from, then runs the server's own `main` unchanged. chatrpc loads
every model with extra buffer types off (service/engine/model.py), so both then run the same
kernels. Elsewhere the peer keeps llama.cpp's default (repacked weights where the CPU has a kernel
for them).
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


def main() -> None:
    import llama_cpp.llama_cpp as low_level
    from llama_cpp.server.__main__ import main as serve

    if cpu_has_amx():
        defaults = low_level.llama_model_default_params

        def without_extra_buffer_types():  # noqa: ANN202 - llama_model_params
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_buffer_types
    serve()


if __name__ == "__main__":
    main()
