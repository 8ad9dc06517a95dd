"""A server in a child process on this machine's loopback ports: started, awaited until healthy,
stopped. Tests and benchmarks run chatrpc (and the benchmarks' peer) this way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def serve_command(grpc_port: int, rest_port: int, *flags: str) -> list[str]:
    """`chatrpc serve` on loopback ports, with this interpreter."""
    return [
        sys.executable, "-m", "chatrpc", "serve", "--grpc-port", str(grpc_port), "--port", str(rest_port),
        "--log-level", "warning", *flags,
    ]  # fmt: skip


class LocalServer:
    """A server process with its output in a log file. `wait_ready` polls its health URL; `stop`
    sends SIGTERM and kills it if it has not exited after a grace."""

    def __init__(
        self,
        name: str,
        command: list[str],
        health_url: str,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.health_url, self.log_path = name, health_url, log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=dict(os.environ if env is None else env), stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 300) -> None:
        """Until the health URL answers 200 (the first start of chatrpc assembles the embedded model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.health_url, timeout=2) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

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
