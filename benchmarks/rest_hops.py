"""Where a one-token request's time goes, hop by hop, REST against gRPC: packet times on loopback.

    sudo .venv/bin/python benchmarks/rest_hops.py [--rounds 200]     # needs tcpdump, and root for it

Starts chatrpc (`chatrpc serve`) on free loopback ports and sends one-token streaming requests,
alternately through REST (serving.py's RawHttpClient) and directly through gRPC (its GrpcClient), in
shuffled order, while tcpdump records every packet with a payload on the two ports. Each request's
client-side send and end are matched to its packets, which splits its latency into

  client send    the client's call until its request packet leaves
  in-hop         (REST) the client's packet to the adapter's gRPC request packet: uvicorn,
                 Starlette, the adapter's translation and grpc.aio's call set-up, in the adapter
  service        the last request packet to the service's first answer packet: template, tokens,
                 prefill, sampling (varies by several ms from request to request)
  answer         the service's first answer packet to the end of the stream at the client: the
                 rest of the service's messages, the adapter's relay (REST), the client's reading

and prints the medians per path, the median per-round differences (REST minus gRPC in the same
round, as serving.py's REST overhead), and the median packet sequence of each path's answer. It is
a diagnostic beside serving.py, not a second measurement of the goal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import PROMPTS, GrpcClient, RawHttpClient, chatrpc_command, start

from chatrpc.local_server import free_port

_CONTROL_FRAME = 17
_PACKET = re.compile(r"(\d+\.\d+) IP \S+?\.(\d+) > \S+?\.(\d+): tcp (\d+)")


def read_packets(path: Path) -> list[tuple[float, int, int, int]]:
    """(time, source port, destination port, payload bytes) of every packet with a payload."""
    packets = []
    for line in path.read_text().splitlines():
        match = _PACKET.match(line)
        if match and int(match.group(4)) > 0:
            packets.append((float(match.group(1)), int(match.group(2)), int(match.group(3)), int(match.group(4))))
    return packets


async def send_rounds(rest_port: int, grpc_port: int, rounds: int) -> list[tuple[int, str, float, float]]:
    """(round, path, wall-clock send, wall-clock end) of every request, in order."""
    clients = {"rest": RawHttpClient(f"http://127.0.0.1:{rest_port}/v1"), "grpc": GrpcClient(f"127.0.0.1:{grpc_port}")}
    messages = [{"role": "user", "content": PROMPTS[0]}]
    marks = []
    order = random.Random(5)
    try:
        for index in range(-3, rounds):  # three rounds to open and warm the connections
            for name in order.sample(sorted(clients), 2):
                started = time.time()
                result = await clients[name].stream(messages, 1)
                ended = time.time()
                if not result.ok:
                    raise RuntimeError(f"{name} request failed: {result.error}")
                if index >= 0:
                    marks.append((index, name, started, ended))
    finally:
        for client in clients.values():
            await client.close()
    return marks


def split(marks, packets, rest_port: int, grpc_port: int) -> dict[str, list[dict]]:
    """Each request's round, phases (ms) and its answer's packet sequence."""
    requests: dict[str, list[dict]] = {"rest": [], "grpc": []}
    for round_index, name, started, ended in marks:
        # HTTP/2 PING, WINDOW_UPDATE and SETTINGS frames alone (17 bytes or fewer; gRPC's bandwidth
        # probes) carry no part of the request or its answer.
        mine = [p for p in packets if started <= p[0] <= ended and p[3] > _CONTROL_FRAME]
        from_service = [p for p in mine if p[1] == grpc_port]
        if not from_service:
            continue
        first_answer = from_service[0][0]
        to_service = [p[0] for p in mine if p[2] == grpc_port and p[0] < first_answer]
        if not to_service:
            continue
        phases = {"service": first_answer - to_service[-1], "answer": ended - first_answer}
        if name == "rest":
            to_adapter = [p[0] for p in mine if p[2] == rest_port]
            if not to_adapter:
                continue
            phases |= {"client send": to_adapter[0] - started, "in-hop": to_service[0] - to_adapter[0]}
        else:
            phases["client send"] = to_service[0] - started
        sequence = []
        for when, source, _destination, size in mine:
            if when >= first_answer:
                sender = "service" if source == grpc_port else "adapter" if source == rest_port else "client"
                sequence.append((1e3 * (when - first_answer), sender, size))
        sequence.append((1e3 * (ended - first_answer), "end", 0))
        requests[name].append(
            {"round": round_index, "phases": {k: 1e3 * v for k, v in phases.items()}, "sequence": sequence}
        )
    return requests


def report(requests: dict[str, list[dict]]) -> list[str]:
    median = statistics.median
    phases = ["client send", "in-hop", "service", "answer"]
    lines = ["| phase | REST median ms | gRPC median ms | median of per-round differences ms |", "|---|---:|---:|---:|"]
    rest, grpc = requests["rest"], requests["grpc"]
    grpc_by_round = {g["round"]: g for g in grpc}
    pairs = [(r, grpc_by_round[r["round"]]) for r in rest if r["round"] in grpc_by_round]
    for phase in [*phases, "total"]:

        def value(request: dict, phase: str = phase) -> float:
            p = request["phases"]
            return sum(p.get(k, 0.0) for k in phases) if phase == "total" else p.get(phase, 0.0)

        lines.append(
            f"| {phase} | {median(value(r) for r in rest):.3f} | {median(value(g) for g in grpc):.3f} | "
            f"{median(value(r) - value(g) for r, g in pairs):+.3f} |"
        )
    lines.append("")
    for name, label in (("rest", "REST"), ("grpc", "gRPC")):
        # The commonest shape of answer (number of packets), its packets' median times.
        shape = Counter(len(r["sequence"]) for r in requests[name]).most_common(1)[0][0]
        alike = [r["sequence"] for r in requests[name] if len(r["sequence"]) == shape]
        steps = [f"{alike[0][i][1]} {alike[0][i][2]} B at {median(s[i][0] for s in alike):.2f}" for i in range(shape)]
        lines.append(f"{label} answer ({len(alike)} of {len(requests[name])} requests): " + ", ".join(steps) + " ms")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("tcpdump") is None:
        sys.exit("tcpdump is not installed (apt-get install tcpdump)")
    scratch = Path(tempfile.mkdtemp(prefix="chatrpc-hops-"))
    grpc_port, rest_port = free_port(), free_port()
    server = start("chatrpc", chatrpc_command(grpc_port, rest_port, 8), f"http://127.0.0.1:{rest_port}/health", scratch)
    dump_path = scratch / "packets.txt"
    try:
        server.wait_ready()
        with dump_path.open("w") as dump_file:
            dump = subprocess.Popen(
                ["tcpdump", "-i", "lo", "-nn", "-tt", "-l", "-q", f"tcp and (port {rest_port} or port {grpc_port})"],
                stdout=dump_file, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                await asyncio.sleep(1.0)
                if dump.poll() is not None:
                    sys.exit("tcpdump could not capture on lo (it needs root or CAP_NET_RAW)")
                marks = await send_rounds(rest_port, grpc_port, args.rounds)
                await asyncio.sleep(0.5)
            finally:
                dump.terminate()
                dump.wait()
    finally:
        server.stop()
    requests = split(marks, read_packets(dump_path), rest_port, grpc_port)
    (scratch / "requests.json").write_text(json.dumps(requests))
    print(
        f"{args.rounds} rounds, one-token streaming requests, REST and gRPC in shuffled order (raw data: {scratch})\n"
    )
    print("\n".join(report(requests)))


if __name__ == "__main__":
    asyncio.run(main())
