"""Fair admission across API keys: key B's time to first token while key A floods the queue.

    .venv/bin/python benchmarks/fairness.py [--rounds 3] [--samples 10] [--queued 200] [--json out.json]

Starts `chatrpc serve` with two API keys (A and B) on free loopback ports, its other settings the
defaults (`--parallel 8`, `--max-waiting 256`), and stops it at the end. Each round has two phases:

  idle    key B alone sends --samples streaming requests, one after another
  flood   key A keeps --queued + --parallel unary requests in flight, sending another as each one
          ends, so that about --queued of them wait while --parallel run; once A's queue is in
          steady state (its first --parallel answers are back), B sends --samples requests as idle

Every request is greedy, with the end tokens banned so that it generates exactly its tokens (A:
--a-tokens, few, so that A's queue moves; B: --b-tokens), and a prompt of its own, numbered at the
start so that no request reuses another's prompt through the prefix cache.

Per round: B's TTFT (from sending to its first content token) p50 and p90, idle and under the flood;
the ratio of the p50s, whose goal is at most 2; A's answers per second during the flood, and the
wait a first-in-first-out queue would have given B behind A's queue at that rate (--queued / rate,
computed, not measured); and the share of the CPUs that other processes took during each phase
(the machine may be shared: before each phase the run waits, up to --quiet-wait seconds, for the
other processes to leave the CPUs idle, and a round during which they took more than --quiet-below
is measured again, up to --retries times). The last row is the median over the rounds.

Bounded: at most --samples requests of B per phase, A's flood stops with its phase, no request of
B starts after --cap seconds from the start of the run, and every call has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import END_TOKENS, MODEL_ID, PROMPTS, ForeignLoad, percentile

from chatrpc.local_server import LocalServer, free_port, serve_command
from chatrpc.v1 import chat_pb2, chat_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
KEY_A, KEY_B = "fairness-bench-key-a", "fairness-bench-key-b"


def request(number: int, max_tokens: int, *, stream: bool) -> chat_pb2.ChatCompletionRequest:
    text = f"Request {number}. {PROMPTS[number % len(PROMPTS)]}"
    return chat_pb2.ChatCompletionRequest(
        model=MODEL_ID, temperature=0, max_tokens=max_tokens, stream=stream,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=text)],
        logit_bias={token: -100 for token in END_TOKENS},
    )  # fmt: skip


def metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class Numbers:
    """Request numbers, never repeated within a run."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        self._next += 1
        return self._next


async def ttft(stub, number: int, max_tokens: int, timeout: float) -> float:
    """Seconds from sending key B's streaming request to its first content token; it is read to the end."""
    start = time.perf_counter()
    first = None
    call = stub.StreamChatCompletion(
        request(number, max_tokens, stream=True), metadata=metadata(KEY_B), timeout=timeout
    )
    async for chunk in call:
        if first is None and any(choice.delta.content for choice in chunk.choices):
            first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("key B's request ended without content")
    return first


async def b_samples(stub, numbers: Numbers, args: argparse.Namespace, deadline: float) -> list[float]:
    samples = []
    for _ in range(args.samples):
        if time.monotonic() > deadline:
            break
        samples.append(await ttft(stub, numbers(), args.b_tokens, timeout=args.request_timeout))
    return samples


class Flood:
    """Key A's requests: `outstanding` in flight at all times, each sent again as it ends, until stopped."""

    def __init__(self, stub, numbers: Numbers, outstanding: int, max_tokens: int, timeout: float) -> None:
        self.answers = 0
        self.errors: dict[str, int] = {}
        self._stub, self._numbers, self._max_tokens, self._timeout = stub, numbers, max_tokens, timeout
        self._tasks = [asyncio.create_task(self._client()) for _ in range(outstanding)]

    async def _client(self) -> None:
        while True:
            call = self._stub.CreateChatCompletion(
                request(self._numbers(), self._max_tokens, stream=False),
                metadata=metadata(KEY_A),
                timeout=self._timeout,
            )
            try:
                await call
                self.answers += 1
            except grpc.aio.AioRpcError as error:
                self.errors[error.code().name] = self.errors.get(error.code().name, 0) + 1
                await asyncio.sleep(0.1)  # a refused request is not retried at once

    async def until_answers(self, count: int, deadline: float) -> None:
        while self.answers < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        # Cancelling the calls cancels them on the server: the waiting ones leave its queue at once.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Round:
    idle: list[float]
    flood: list[float]
    a_rate: float  # A's answers per second while B measured under the flood
    a_errors: dict[str, int]
    idle_other_load: float
    flood_other_load: float

    @property
    def idle_p50(self) -> float:
        return percentile(self.idle, 0.5)

    @property
    def flood_p50(self) -> float:
        return percentile(self.flood, 0.5)

    @property
    def ratio(self) -> float:
        return self.flood_p50 / self.idle_p50


async def run_round(stub, numbers: Numbers, load: ForeignLoad, args: argparse.Namespace, deadline: float) -> Round:
    await load.wait_quiet(args.quiet_below, args.quiet_wait)
    before = load.snapshot()
    idle = await b_samples(stub, numbers, args, deadline)
    idle_load = load.since(before)

    await load.wait_quiet(args.quiet_below, args.quiet_wait)
    flood = Flood(stub, numbers, args.queued + args.parallel, args.a_tokens, args.request_timeout)
    try:
        await flood.until_answers(args.parallel, deadline)
        answers, start, before = flood.answers, time.monotonic(), load.snapshot()
        under_flood = await b_samples(stub, numbers, args, deadline)
        a_rate = (flood.answers - answers) / (time.monotonic() - start)
        flood_load = load.since(before)
    finally:
        await flood.stop()
    return Round(idle, under_flood, a_rate, dict(flood.errors), idle_load, flood_load)


def table(rounds: list[Round], queued: int) -> str:
    ms = 1000.0
    lines = [
        "| round | B idle TTFT p50, ms | p90, ms | B TTFT under A's flood p50, ms | p90, ms | ratio of p50s "
        "| A answers/s | FIFO wait behind A's queue, s | other processes' CPU share, idle / flood |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, r in enumerate(rounds, 1):
        lines.append(
            f"| {index} | {r.idle_p50 * ms:.0f} | {percentile(r.idle, 0.9) * ms:.0f} | {r.flood_p50 * ms:.0f} "
            f"| {percentile(r.flood, 0.9) * ms:.0f} | {r.ratio:.2f} | {r.a_rate:.1f} | {queued / r.a_rate:.0f} "
            f"| {r.idle_other_load:.0%} / {r.flood_other_load:.0%} |"
        )

    def median(values) -> float:
        return statistics.median(list(values))

    lines.append(
        f"| median | {median(r.idle_p50 for r in rounds) * ms:.0f} "
        f"| {median(percentile(r.idle, 0.9) for r in rounds) * ms:.0f} "
        f"| {median(r.flood_p50 for r in rounds) * ms:.0f} "
        f"| {median(percentile(r.flood, 0.9) for r in rounds) * ms:.0f} | {median(r.ratio for r in rounds):.2f} "
        f"| {median(r.a_rate for r in rounds):.1f} | {median(queued / r.a_rate for r in rounds):.0f} | |"
    )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Round]:
    log_dir = Path(tempfile.mkdtemp(prefix="chatrpc-fairness-"))
    grpc_port, rest_port = free_port(), free_port()
    env = dict(os.environ, CHATRPC_API_KEYS=f"{KEY_A},{KEY_B}")
    command = serve_command(grpc_port, rest_port, "--parallel", str(args.parallel), *args.server_flags.split())
    server = LocalServer(
        "chatrpc", command, f"http://127.0.0.1:{rest_port}/health", log_dir / "chatrpc.log", env=env, cwd=REPO
    )
    try:
        server.wait_ready()
        deadline = time.monotonic() + args.cap
        load = ForeignLoad([os.getpid(), server.pid], knows_servers=True)
        numbers = Numbers()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = chat_pb2_grpc.ChatCompletionsStub(channel)
            await ttft(stub, numbers(), args.b_tokens, timeout=args.request_timeout)  # warm-up, not counted
            rounds = []
            for index in range(args.rounds):
                if time.monotonic() > deadline:
                    print(f"--cap reached after {index} rounds", file=sys.stderr)
                    break
                for attempt in range(args.retries + 1):
                    measured = await run_round(stub, numbers, load, args, deadline)
                    busy = max(measured.idle_other_load, measured.flood_other_load)
                    print(f"round {index + 1}: ratio {measured.ratio:.2f}, other load {busy:.0%}", file=sys.stderr)
                    # llama.cpp's threads wait for each other at every step: one busy core slows a
                    # phase many times over, so a round that others disturbed is measured again.
                    if busy <= args.quiet_below or attempt == args.retries or time.monotonic() > deadline:
                        break
                rounds.append(measured)
        return rounds
    finally:
        server.stop()
        print(f"server log: {log_dir}", file=sys.stderr)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description="key B's TTFT while key A floods the queue (loopback only)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each idle then flood (default: 3)")
    parser.add_argument("--samples", type=int, default=10, help="key B's requests per phase (default: 10)")
    parser.add_argument("--queued", type=int, default=200, help="key A's requests kept waiting (default: 200)")
    parser.add_argument("--parallel", type=int, default=8, help="chatrpc's --parallel (default: 8)")
    parser.add_argument("--a-tokens", type=int, default=8, help="tokens of each of key A's requests (default: 8)")
    parser.add_argument("--b-tokens", type=int, default=8, help="tokens of each of key B's requests (default: 8)")
    parser.add_argument("--request-timeout", type=float, default=300, help="deadline of every call, s (default: 300)")
    parser.add_argument("--cap", type=float, default=900, help="no phase starts after this many seconds (default: 900)")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.1,
        help="before each phase, wait until other processes use less than this share of the CPUs (default: 0.1)",
    )
    parser.add_argument("--quiet-wait", type=float, default=60, help="wait no longer than this, s (default: 60)")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measurements of a round again when other processes took more than --quiet-below of the CPUs "
        "during it (default: 2)",
    )
    parser.add_argument("--server-flags", default="", help="more flags for `chatrpc serve`, one string")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    if args.queued + args.parallel + 1 > 256:
        # All of A's requests may arrive before any is admitted, and B's must find room too.
        parser.error("--queued + --parallel + 1 must stay within chatrpc's default --max-waiting (256)")

    rounds = asyncio.run(run(args))
    if not rounds:
        sys.exit("no round completed")
    print(table(rounds, args.queued))
    errors = sum((collections.Counter(r.a_errors) for r in rounds), collections.Counter())
    print(f"\nkey A's errors: {dict(errors) or 'none'}; {cpu_model()}, {os.cpu_count()} CPUs")
    if args.json:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "rounds": [asdict(r) for r in rounds]}, indent=1))


if __name__ == "__main__":
    main()
