"""Fixtures that start the real chatrpc server (gRPC + REST adapter) on free loopback ports.

The server runs the embedded Gemma 3 270M model, as `chatrpc serve` does, with one API key.
It is started once per test session and stopped at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789"
PARALLEL = 4
CTX_SIZE = 2048
MODEL_ID = "gemma-3-270m"
# The same weights served a second time with tools and JSON modes switched off, to test refusals.
PLAIN_MODEL_ID = "gemma-3-270m-plain"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    grpc_target: str
    rest_base_url: str  # ends with /v1
    api_key: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp_dir: Path, *, extra_args: tuple[str, ...] = (), env_keys: str | None = API_KEY) -> RunningServer:
    grpc_port, rest_port = free_port(), free_port()
    env = dict(os.environ)
    env.pop("CHATRPC_API_KEYS", None)
    if env_keys is not None:
        env["CHATRPC_API_KEYS"] = env_keys
    log_path = tmp_dir / f"server-{grpc_port}.log"
    log_file = log_path.open("w")
    command = [
        sys.executable, "-m", "chatrpc", "serve",
        "--grpc-port", str(grpc_port), "--port", str(rest_port),
        "--parallel", str(PARALLEL), "--ctx-size", str(CTX_SIZE), "--log-level", "warning",
        "--model", f"{PLAIN_MODEL_ID}=@embedded,tools=off,json=off",
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{rest_port}/v1", API_KEY, process, log_path)
    deadline = time.monotonic() + 300  # the first start assembles the embedded model
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"http://127.0.0.1:{rest_port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def grpc_channel(server: RunningServer):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def auth_metadata(server: RunningServer) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {server.api_key}"),)


@pytest.fixture(scope="session")
def openai_client(server: RunningServer):
    import openai

    return openai.OpenAI(base_url=server.rest_base_url, api_key=server.api_key, max_retries=0, timeout=120)
