"""llama-cpp-python's own server (the serving benchmark's peer), runnable on CPUs with AMX.

    .venv/bin/python benchmarks/llama_cpp_peer.py --model PATH --chat_format gemma ...   # the server's own flags

The same as `python -m llama_cpp.server`, after `avoid_amx_extra_buffers` (llama_cpp_amx.py: on a
CPU with AMX the server dies with SIGILL on its first prompt otherwise).
"""

from __future__ import annotations

from llama_cpp_amx import avoid_amx_extra_buffers


def main() -> None:
    from llama_cpp.server.__main__ import main as serve

    avoid_amx_extra_buffers()
    serve()


if __name__ == "__main__":
    main()
