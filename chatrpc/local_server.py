"""A server in a child process on this machine's loopback ports: started, awaited until healthy,
stopped. Tests and benchmarks run chatrpc (and the benchmarks' peer) this way: `chatrpc serve`
(`serve_command`), or the gRPC service and the REST adapter as two processes (`grpc_command`,
`rest_command`), so that one can be stopped or killed while the other lives.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LOOPBACK = "127.0.0.1"
GRPC_HEALTH_SCHEME = "grpc://"


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def serve_command(grpc_port: int, rest_port: int, *flags: str) -> list[str]:
    """`chatrpc serve` on loopback ports, with this interpreter; no service /metrics port unless
    `flags` give one (several servers run at once)."""
    return [
        sys.executable, "-m", "chatrpc", "serve", "--grpc-port", str(grpc_port), "--port", str(rest_port),
        "--log-level", "warning", "--metrics-port", "0", *flags,
    ]  # fmt: skip


def grpc_command(port: int, *flags: str) -> list[str]:
    """`chatrpc grpc` (the service alone) on a loopback port, with this interpreter; no /metrics port
    unless `flags` give one."""
    return [
        sys.executable, "-m", "chatrpc", "grpc", "--port", str(port), "--log-level", "warning",
        "--metrics-port", "0", *flags,
    ]  # fmt: skip


def rest_command(port: int, upstream_port: int, *flags: str) -> list[str]:
    """`chatrpc rest` (the adapter alone) on a loopback port, in front of the service on `upstream_port`."""
    return [
        sys.executable, "-m", "chatrpc", "rest", "--port", str(port), "--upstream", f"{LOOPBACK}:{upstream_port}",
        "--log-level", "warning", *flags,
    ]  # fmt: skip


def grpc_serving(target: str, timeout: float = 2, credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Whether the standard gRPC health check of the server at `target` (HOST:PORT) says SERVING;
    asked over TLS with `credentials`, in plaintext without."""
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


class LocalServer:
    """A server process with its output in a log file. `wait_ready` polls its health URL: an HTTP URL
    that answers 200, or `grpc://HOST:PORT` for the standard gRPC health check; `stop` sends SIGTERM
    and kills it if it has not exited after a grace. A server that speaks TLS is asked with
    `grpc_credentials` (grpc://) or `ssl_context` (an https:// URL)."""

    def __init__(
        self,
        name: str,
        command: list[str],
        health_url: str,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        grpc_credentials: grpc.ChannelCredentials | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name, self.health_url, self.log_path = name, health_url, log_path
        self.grpc_credentials, self.ssl_context = grpc_credentials, ssl_context
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=dict(os.environ if env is None else env), stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 300) -> None:
        """Until the server is healthy (the first start of chatrpc assembles the embedded model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Whether its health URL says it serves, now."""
        if self.health_url.startswith(GRPC_HEALTH_SCHEME):
            return grpc_serving(self.health_url.removeprefix(GRPC_HEALTH_SCHEME), credentials=self.grpc_credentials)
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(self.health_url, timeout=2, context=self.ssl_context) as answer,
        ):
            return answer.status == 200
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, grace: float = 30) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
