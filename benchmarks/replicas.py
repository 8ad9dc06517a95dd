"""Several replicas behind one adapter, on loopback: failover, and what prefix routing buys.

    .venv/bin/python benchmarks/replicas.py failover [--requests 300] [--json out.json]
    .venv/bin/python benchmarks/replicas.py prefix [--chats 6 --turns 6 --rounds 2] [--json out.json]

Both start `--replicas` (3) `chatrpc grpc` processes and one `chatrpc rest --upstream ipv4:...` in
front of them (adapters/rest/routing.py: gRPC's own balancing, health checks and retries).

failover: `--requests` streaming chat completions of `--max-tokens` (16) tokens, each with a prompt
of its own, on `--concurrency` (8) streams. Once a quarter of them have ended, replica 0 gets SIGTERM
(it drains: NOT_SERVING, then `--grace` for the calls it runs); once half have, replica 1 gets
SIGKILL. A request counts as failed when it got an HTTP error or an error event, or fewer tokens.
Only the requests running on the killed replica may fail: every failure must have been in flight
at the SIGKILL (sent before it, ended after it). Prints the counts and the errors seen.

prefix: `--chats` concurrent chats of `--turns` turns each (a system prompt of its own, the whole
history resent each turn, `--chat-tokens` (64) tokens per answer, back to back), once on replicas
behind `--routing round-robin` and once behind `--routing prefix`, each on freshly started
replicas, `--rounds` times in alternating order. Prints the median time to first token per turn,
the ratio prefix / round-robin at the last turn, and the share of prompt tokens served from the
prefix caches (`usage.prompt_tokens_details.cached_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatrpc.local_server import GRPC_HEALTH_SCHEME, LOOPBACK, LocalServer, free_port, grpc_command, rest_command

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "gemma-3-270m"
NO_END = {"1": -100, "106": -100, "212": -100}  # Gemma's end-of-generation tokens: every answer is full length


class Fleet:
    """`count` replicas and an adapter in front of them."""

    def __init__(self, log_dir: Path, count: int, routing: str, replica_flags: list[str]) -> None:
        env = {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}
        ports = [free_port() for _ in range(count)]
        self.replicas = [
            LocalServer(
                f"replica-{index}", grpc_command(port, *replica_flags), GRPC_HEALTH_SCHEME + f"{LOOPBACK}:{port}",
                log_dir / f"replica-{index}-{port}.log", env=env, cwd=REPO,
            )
            for index, port in enumerate(ports)
        ]  # fmt: skip
        rest_port = free_port()
        target = "ipv4:" + ",".join(f"{LOOPBACK}:{port}" for port in ports)
        self.adapter = LocalServer(
            "adapter", rest_command(rest_port, ports[0], "--upstream", target, "--routing", routing),
            f"http://{LOOPBACK}:{rest_port}/health/ready", log_dir / f"adapter-{routing}-{rest_port}.log",
            env=env, cwd=REPO,
        )  # fmt: skip
        self.url = f"http://{LOOPBACK}:{rest_port}/v1/chat/completions"

    def __enter__(self) -> Fleet:
        try:
            for server in (*self.replicas, self.adapter):
                server.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        for server in (self.adapter, *self.replicas):
            if server.process.poll() is None:
                server.stop()


@dataclass
class Outcome:
    ok: bool
    error: str
    sent: float  # time.monotonic()
    ended: float
    ttft: float
    tokens: int
    text: str
    prompt_tokens: int
    cached_tokens: int


async def stream_chat(http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> Outcome:
    """One streamed chat completion; its timings, text and usage."""
    body = {
        "model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "logit_bias": NO_END,
    }  # fmt: skip
    sent = time.monotonic()
    ttft, parts, usage, error = 0.0, [], {}, ""
    try:
        async with http.stream("POST", url, json=body) as answer:
            if answer.status_code != 200:
                error = f"HTTP {answer.status_code}: {(await answer.aread()).decode(errors='replace')[:200]}"
            else:
                async for line in answer.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        error = f"error event: {event['error'].get('code')}: {event['error'].get('message')}"
                        break
                    for choice in event.get("choices", ()):
                        if choice["delta"].get("content"):
                            ttft = ttft or time.monotonic() - sent
                            parts.append(choice["delta"]["content"])
                    usage = event.get("usage") or usage
    except httpx.HTTPError as failure:
        error = f"{type(failure).__name__}: {failure}"
    tokens = usage.get("completion_tokens", 0)
    if not error and tokens != max_tokens:
        error = f"{tokens} tokens instead of {max_tokens}"
    return Outcome(
        ok=not error, error=error, sent=sent, ended=time.monotonic(), ttft=ttft, tokens=tokens, text="".join(parts),
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    )  # fmt: skip


# ---- failover ----------------------------------------------------------------------------------


async def failover(args: argparse.Namespace, log_dir: Path) -> dict:
    flags = ["--parallel", str(args.parallel), "--grace", str(args.grace)]
    with Fleet(log_dir, args.replicas, args.routing, flags) as fleet:
        outcomes: list[Outcome] = []
        events: dict[str, float] = {}
        pending = iter(range(args.requests))

        def strike() -> None:
            done = len(outcomes)
            if "sigterm" not in events and done >= args.requests // 4:
                fleet.replicas[0].process.send_signal(signal.SIGTERM)
                events["sigterm"] = time.monotonic()
                print(f"SIGTERM to replica 0 after {done} requests", flush=True)
            if "sigkill" not in events and done >= args.requests // 2:
                fleet.replicas[1].process.kill()
                events["sigkill"] = time.monotonic()
                print(f"SIGKILL to replica 1 after {done} requests", flush=True)

        async def worker(http: httpx.AsyncClient) -> None:
            for index in pending:
                prompt = f"Request {index}: write a line about the number {index}."
                outcomes.append(
                    await stream_chat(http, fleet.url, [{"role": "user", "content": prompt}], args.max_tokens)
                )
                strike()

        started = time.monotonic()
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as http:
            await asyncio.wait_for(asyncio.gather(*(worker(http) for _ in range(args.concurrency))), args.cap)
        wall = time.monotonic() - started
        drained = fleet.replicas[0].process.wait(timeout=60)
    kill = events["sigkill"]
    failed = [o for o in outcomes if not o.ok]
    in_flight = [o for o in failed if o.sent <= kill <= o.ended]
    report = {
        "requests": len(outcomes),
        "ok": len(outcomes) - len(failed),
        "failed": len(failed),
        "failed_in_flight_at_sigkill": len(in_flight),
        "failed_otherwise": len(failed) - len(in_flight),
        "running_at_sigkill": sum(1 for o in outcomes if o.sent <= kill <= o.ended),
        "drained_replica_exit_code": drained,
        "wall_seconds": round(wall, 1),
        "errors": sorted({o.error for o in failed}),
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    return report


# ---- prefix routing ----------------------------------------------------------------------------


async def chat(http: httpx.AsyncClient, url: str, number: int, turns: int, max_tokens: int) -> list[Outcome]:
    messages = [
        {"role": "system", "content": f"You are assistant number {number}. Answer each question in a short paragraph."}
    ]
    questions = ["Tell me about rivers.", "And mountains?", "And deserts?", "And forests?", "And oceans?", "And lakes?"]
    outcomes = []
    for turn in range(turns):
        messages.append({"role": "user", "content": questions[turn % len(questions)]})
        outcome = await stream_chat(http, url, messages, max_tokens)
        outcomes.append(outcome)
        if not outcome.ok:
            break
        messages.append({"role": "assistant", "content": outcome.text})
    return outcomes


async def prefix(args: argparse.Namespace, log_dir: Path) -> dict:
    flags = ["--parallel", str(args.parallel)]
    runs: dict[str, list[list[list[Outcome]]]] = {"round-robin": [], "prefix": []}
    for round_index in range(args.rounds):
        order = ["round-robin", "prefix"] if round_index % 2 == 0 else ["prefix", "round-robin"]
        for routing in order:
            with Fleet(log_dir, args.replicas, routing, flags) as fleet:
                async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as http:
                    chats = await asyncio.gather(
                        *(chat(http, fleet.url, number, args.turns, args.chat_tokens) for number in range(args.chats))
                    )
            runs[routing].append(chats)
            last = [c[-1].ttft for c in chats if len(c) == args.turns and c[-1].ok]
            print(f"round {round_index + 1} {routing}: turn {args.turns} TTFT median {statistics.median(last):.3f} s")
    report: dict = {"turns": {}, "hit_rate": {}}
    for routing, rounds in runs.items():
        outcomes = [o for chats in rounds for c in chats for o in c]
        errors = [o.error for o in outcomes if not o.ok]
        per_turn = {
            turn + 1: statistics.median(c[turn].ttft for chats in rounds for c in chats if len(c) > turn and c[turn].ok)
            for turn in range(args.turns)
        }
        report["turns"][routing] = per_turn
        report["hit_rate"][routing] = sum(o.cached_tokens for o in outcomes) / max(
            1, sum(o.prompt_tokens for o in outcomes)
        )
        report.setdefault("errors", {})[routing] = errors
        print(
            f"{routing}: TTFT by turn (s) " + ", ".join(f"{t}: {v:.3f}" for t, v in per_turn.items())
            + f"; prompt tokens from the cache {report['hit_rate'][routing]:.1%}; {len(errors)} errors"
        )  # fmt: skip
    ratio = report["turns"]["prefix"][args.turns] / report["turns"]["round-robin"][args.turns]
    report["last_turn_ratio"] = ratio
    print(f"turn {args.turns} TTFT, prefix / round-robin: {ratio:.2f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["failover", "prefix"])
    parser.add_argument("--replicas", type=int, default=3, help="replicas (default: 3)")
    parser.add_argument("--parallel", type=int, default=4, help="each replica's --parallel (default: 4)")
    parser.add_argument("--routing", default="prefix", help="the adapter's --routing in failover (default: prefix)")
    parser.add_argument("--requests", type=int, default=300, help="failover: requests (default: 300)")
    parser.add_argument("--concurrency", type=int, default=8, help="failover: streams at once (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="failover: tokens per request (default: 16)")
    parser.add_argument("--grace", type=float, default=10.0, help="failover: the drained replica's --grace (10)")
    parser.add_argument("--cap", type=float, default=1200, help="failover: seconds the load may take (1200)")
    parser.add_argument("--chats", type=int, default=6, help="prefix: concurrent chats (default: 6)")
    parser.add_argument("--turns", type=int, default=6, help="prefix: turns per chat (default: 6)")
    parser.add_argument("--chat-tokens", type=int, default=64, help="prefix: tokens per answer (default: 64)")
    parser.add_argument("--rounds", type=int, default=2, help="prefix: rounds of both policies (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped, it still stops its servers
    log_dir = Path(tempfile.mkdtemp(prefix=f"chatrpc-replicas-{args.what}-"))
    print(f"server logs in {log_dir}", flush=True)
    report = asyncio.run(failover(args, log_dir) if args.what == "failover" else prefix(args, log_dir))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=lambda o: asdict(o)))


if __name__ == "__main__":
    main()
