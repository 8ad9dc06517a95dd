"""Fixtures that start the real chatrpc server (gRPC + REST adapter) on free loopback ports.

The server runs the embedded Gemma 3 270M model, as `chatrpc serve` does, with one API key.
It is started once per test session and stopped at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from chatrpc.local_server import LocalServer, free_port, serve_command

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789"
PARALLEL = 4
CTX_SIZE = 2048
MODEL_ID = "gemma-3-270m"
# The same weights served a second time with tools and JSON modes switched off, to test refusals.
PLAIN_MODEL_ID = "gemma-3-270m-plain"


@dataclass
class RunningServer:
    grpc_target: str
    rest_base_url: str  # ends with /v1
    api_key: str
    process: LocalServer

    def log(self) -> str:
        return self.process.log()


def start_server(tmp_dir: Path, *, extra_args: tuple[str, ...] = (), env_keys: str | None = API_KEY) -> RunningServer:
    """`chatrpc serve` with the test settings (and `extra_args`), once healthy."""
    grpc_port, rest_port = free_port(), free_port()
    env = dict(os.environ)
    env.pop("CHATRPC_API_KEYS", None)
    if env_keys is not None:
        env["CHATRPC_API_KEYS"] = env_keys
    command = serve_command(
        grpc_port, rest_port,
        "--parallel", str(PARALLEL), "--ctx-size", str(CTX_SIZE),
        "--model", f"{PLAIN_MODEL_ID}=@embedded,tools=off,json=off",
        *extra_args,
    )  # fmt: skip
    health = f"http://127.0.0.1:{rest_port}/health"
    process = LocalServer("chatrpc", command, health, tmp_dir / f"server-{grpc_port}.log", env=env, cwd=REPO)
    process.wait_ready()
    return RunningServer(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{rest_port}/v1", API_KEY, process)


def stop_server(server: RunningServer) -> None:
    server.process.stop()


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
