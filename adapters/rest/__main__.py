"""``python -m adapters.rest``: serve the REST adapter in front of a chatrpc gRPC service."""

from __future__ import annotations

import argparse

from adapters.rest.app import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m adapters.rest",
        description="Serve the OpenAI-compatible REST API (JSON and SSE) in front of a chatrpc gRPC service.",
    )
    parser.add_argument(
        "--upstream", required=True, metavar="HOST:PORT", help="address of the chatrpc gRPC service"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    run(args.host, args.port, args.upstream, args.log_level)


if __name__ == "__main__":
    main()
