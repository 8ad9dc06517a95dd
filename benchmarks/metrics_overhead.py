"""What Prometheus metrics cost in serving throughput: this checkout with both /metrics scraped,
against a build from before them, side by side on the same machine, loopback only.

    .venv/bin/python benchmarks/metrics_overhead.py --before 8d8eda6 --rounds 6 [--json out.json]
    .venv/bin/python benchmarks/metrics_overhead.py --micro      # the added work alone, in this process

Starts two `chatrpc serve --parallel 8`: "before" from a git worktree of `--before` (the sampler
extension copied from this checkout's build, so the revision must have the same Rust sources) and
"after" from this checkout with the service's `--metrics-port`, while a scraper reads the service's
and the adapter's /metrics every `--scrape-interval` seconds (5, three times Prometheus's default
rate). Each round runs serving.py's streaming load through REST (every metric on the way: the
adapter's and the service's) at each of `--levels` on both servers, in random order, each once the
machine is quiet; it prints every round's aggregate tok/s and the medians, and the ratio
after / before of the medians and the median of per-round ratios.

On a shared 2-vCPU machine two runs of the same build differ by more than 1 %, so `--micro` also
times, in this process, exactly what the metrics add to a request: the service's per-call work
(ServiceMetrics.call_ended on a finished call's record, with the real model's registry), the per-step
counter, a scrape of each registry, and the adapter's middlewares (metrics and access line) around an
ASGI app that answers at once. Their sum per request, against a request's time at 8 streams, bounds
the throughput the metrics can cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving

from chatrpc.local_server import LocalServer, free_port

REPO = serving.REPO


def worktree_at(revision: str, into: Path) -> Path:
    """A checkout of `revision` with this checkout's built sampler extension."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), revision], check=True)
    for built in (REPO / "sampler_ext").glob("_native*.so"):
        shutil.copy2(built, into / "sampler_ext" / built.name)
    return into


def serve(name: str, cwd: Path, log_dir: Path, *flags: str) -> tuple[LocalServer, int]:
    grpc_port, rest_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "chatrpc", "serve", "--grpc-port", str(grpc_port), "--port", str(rest_port),
        "--parallel", "8", "--log-level", "warning", *flags,
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}
    health = f"http://127.0.0.1:{rest_port}/health"
    return LocalServer(name, command, health, log_dir / f"{name}.log", env=env, cwd=cwd), rest_port


def scrape_until(stop: threading.Event, urls: list[str], interval: float, counts: list[int]) -> None:
    while not stop.wait(interval):
        for url in urls:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                answer.read()
                counts[0] += 1


async def run(args: argparse.Namespace) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="chatrpc-metrics-overhead-"))
    tree = worktree_at(args.before, log_dir / "before")
    metrics_port = free_port()
    before, before_port = serve("before", tree, log_dir)
    after, after_port = serve("after", REPO, log_dir, "--metrics-port", str(metrics_port))
    stop, scrapes = threading.Event(), [0]
    urls = [f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{after_port}/metrics"]
    scraper = threading.Thread(target=scrape_until, args=(stop, urls, args.scrape_interval, scrapes), daemon=True)
    clients = {}
    results: dict[str, dict[int, list[float]]] = {"before": {}, "after": {}}
    try:
        before.wait_ready()
        after.wait_ready()
        scraper.start()
        clients = {
            "before": serving.OpenAIClient(f"http://127.0.0.1:{before_port}/v1"),
            "after": serving.OpenAIClient(f"http://127.0.0.1:{after_port}/v1"),
        }
        load = serving.ForeignLoad([os.getpid(), before.pid, after.pid], knows_servers=True)
        for round_index in range(args.rounds):
            for level in args.levels:
                order = list(clients)
                random.shuffle(order)
                for name in order:
                    await load.wait_quiet(args.quiet_below, args.quiet_wait)
                    requests = args.requests or serving.DEFAULT_REQUESTS.get(level, 2 * level)
                    result = await serving.run_level(clients[name], level, requests, args.max_tokens, args.cap)
                    results[name].setdefault(level, []).append(result.aggregate_rate)
                    print(
                        f"round {round_index + 1} level {level} {name}: {result.aggregate_rate:.2f} tok/s, "
                        f"{result.errors} errors",
                        flush=True,
                    )
    finally:
        stop.set()
        for client in clients.values():
            await client.close()
        for server in (before, after):
            server.stop()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    report: dict = {"before": args.before, "scrapes": scrapes[0], "levels": {}}
    for level in args.levels:
        old, new = results["before"][level], results["after"][level]
        paired = [b / a for a, b in zip(old, new, strict=True)]
        report["levels"][level] = {
            "before": old,
            "after": new,
            "ratio_of_medians": statistics.median(new) / statistics.median(old),
            "median_of_ratios": statistics.median(paired),
        }
        print(
            f"level {level}: before {statistics.median(old):.2f} tok/s, after {statistics.median(new):.2f} tok/s; "
            f"after/before {report['levels'][level]['ratio_of_medians']:.3f} (medians), "
            f"{report['levels'][level]['median_of_ratios']:.3f} (median of per-round ratios)"
        )
    print(f"{scrapes[0]} scrapes of the service's and the adapter's /metrics during the run")
    return report


def micro(count: int) -> dict:
    """Microseconds of each piece of work the metrics add, per call (medians of 5 runs)."""
    import logging
    import time

    from prometheus_client import REGISTRY, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from adapters.rest.access_log import AccessLogMiddleware
    from adapters.rest.metrics import MetricsMiddleware
    from service.access_log import CallRecord
    from service.engine.timings import StepTimings
    from service.engine_settings import EngineSettings
    from service.metrics import ServiceMetrics
    from service.models import DEFAULT_MODEL_ID, ModelRegistry, ModelSpec

    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])

    def timed(work, repeat: int = 5) -> float:
        runs = []
        for _ in range(repeat):
            started = time.perf_counter()
            for _ in range(count):
                work()
            runs.append((time.perf_counter() - started) / count * 1e6)
        return statistics.median(runs)

    registry = ModelRegistry([ModelSpec(DEFAULT_MODEL_ID)], EngineSettings(max_sequences=8))
    try:
        metrics = ServiceMetrics(registry)
        now = time.monotonic()

        class Times:  # what a finished Sequence holds (service/access_log.py: EngineTimes)
            queued_at, admitted_at, first_token_at = now + 0.001, now + 0.002, now + 0.05

        def service_call() -> None:
            record = CallRecord("req", "StreamChatCompletion", model=DEFAULT_MODEL_ID, started=now)
            record.engine, record.prompt_tokens, record.completion_tokens = Times, 30, 128
            record.first_token, record.last_token, record.finish_reasons = now + 0.06, now + 3.0, ["length"]
            record.end()
            metrics.call_ended(record)

        timings = StepTimings()
        result = {
            "service_call_ended_us": timed(service_call),
            "step_counter_us": timed(lambda: timings.steps_by_rows.__setitem__(8, timings.steps_by_rows[8] + 1)),
            "service_scrape_us": timed(lambda: generate_latest(metrics.registry), repeat=3),
            "adapter_scrape_us": timed(lambda: generate_latest(REGISTRY), repeat=3),
        }
    finally:
        registry.close()

    async def answer(request):
        return Response(b"{}", media_type="application/json")

    async def requests_through(app, count: int) -> float:
        """Microseconds per request of `app`, called as uvicorn calls it, minus nothing."""
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }  # fmt: skip

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            pass

        started = time.perf_counter()
        for _ in range(count):
            await app(dict(scope), receive, send)
        return (time.perf_counter() - started) / count * 1e6

    plain = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    wrapped = AccessLogMiddleware(MetricsMiddleware(plain))
    runs: dict[str, list[float]] = {"adapter_request_plain_us": [], "adapter_request_with_metrics_us": []}
    for _ in range(5):  # alternated, so that drift falls on both
        runs["adapter_request_plain_us"].append(asyncio.run(requests_through(plain, count)))
        runs["adapter_request_with_metrics_us"].append(asyncio.run(requests_through(wrapped, count)))
    result |= {name: statistics.median(values) for name, values in runs.items()}
    result["adapter_added_us"] = result["adapter_request_with_metrics_us"] - result["adapter_request_plain_us"]
    for key, value in result.items():
        print(f"{key}: {value:.2f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="git revision without the metrics")
    parser.add_argument("--micro", action="store_true", help="time the added work alone, in this process")
    parser.add_argument("--count", type=int, default=2000, help="--micro: calls per timing (default: 2000)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; medians over them (default: 6)")
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8], help="streams (default: 1,8)"
    )
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: serving.py's)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    parser.add_argument("--cap", type=float, default=120, help="seconds a level may start requests (default: 120)")
    parser.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between scrapes (default: 5)")
    parser.add_argument("--quiet-below", type=float, default=0.1, help="as serving.py's (default: 0.1)")
    parser.add_argument("--quiet-wait", type=float, default=60, help="as serving.py's (default: 60)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.micro:
        report = micro(args.count)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    if args.before is None:
        parser.error("--before is needed (or --micro)")
    # Stopped with SIGTERM too, the run still stops its servers and removes its worktree.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
