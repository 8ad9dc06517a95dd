"""llama.cpp's own server, built from the llama.cpp that the installed llama-cpp-python vendors.

    .venv/bin/python benchmarks/llama_server.py            # build once (minutes; docs/benchmarks.md), print its path

The serving benchmark's main peer (serving.py --compare). It is built, not downloaded, because no
binary of that exact llama.cpp exists for this machine, and so that both servers run the same
kernels: the recipe, in `build`, is

- the llama-cpp-python sdist of the installed version from PyPI (sha256 checked), whose
  `vendor/llama.cpp` is the source;
- cmake and ninja from PyPI in a venv of their own (nothing installed on the system);
- `cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON` with AMX off (its repack kernel
  crashes on some Intel CPUs; native otherwise, so AVX2 / AVX-512 are used where the CPU has them),
  OpenSSL and curl off, static libraries, only the `llama-server` target.

The binary is cached under $XDG_CACHE_HOME (~/.cache) by llama-cpp-python version and CPU flags.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import venv
from pathlib import Path

SIMPLE_INDEX = "https://pypi.org/simple/llama-cpp-python/"
CMAKE_FLAGS = [
    "-G",
    "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    version = importlib.metadata.version("llama-cpp-python")
    # GGML_NATIVE compiles for this CPU: a cache shared with another CPU must not hand its binary over.
    cpu = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:8]
    return base / "chatrpc-bench" / f"llama-server-{version}-{cpu}"


def binary() -> Path:
    return cache_dir() / "llama-server"


def _download_sdist(version: str, into: Path) -> Path:
    request = urllib.request.Request(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    name = f"llama_cpp_python-{version}.tar.gz"
    entry = next((f for f in files if f["filename"] == name), None)
    if entry is None:
        raise SystemExit(f"PyPI has no sdist {name}")
    target = into / name
    digest = hashlib.sha256()
    with urllib.request.urlopen(entry["url"], timeout=300) as response, target.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry["hashes"]["sha256"]:
        raise SystemExit(f"{name}: sha256 does not match the index")
    return target


def build(jobs: int | None = None) -> Path:
    """The cached llama-server, built first when missing."""
    if binary().is_file():
        return binary()
    version = importlib.metadata.version("llama-cpp-python")
    destination = cache_dir()
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as scratch:
        work = Path(scratch)
        print(f"downloading llama-cpp-python {version}'s sdist", file=sys.stderr)
        sdist = _download_sdist(version, work)
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        tools = work / "tools"
        venv.create(tools, with_pip=True)
        subprocess.run([tools / "bin" / "python", "-m", "pip", "install", "-q", "cmake", "ninja"], check=True)
        env = {**os.environ, "PATH": f"{tools / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        build_dir = work / "build"
        subprocess.run(["cmake", "-S", source, "-B", build_dir, *CMAKE_FLAGS], check=True, env=env)
        command = ["cmake", "--build", build_dir, "--target", "llama-server"]
        if jobs:
            command += ["-j", str(jobs)]
        subprocess.run(command, check=True, env=env)
        built = build_dir / "bin" / "llama-server"
        # Linked statically (BUILD_SHARED_LIBS off): the binary stands alone once the build is gone.
        shutil.copy2(built, destination / "llama-server.partial")
        (destination / "llama-server.partial").rename(binary())
    return binary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: ninja's)")
    print(build(parser.parse_args().jobs))


if __name__ == "__main__":
    main()
