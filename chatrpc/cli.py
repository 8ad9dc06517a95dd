"""The `chatrpc` command: `serve` (gRPC and REST together), `grpc` and `rest` apart."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("chatrpc")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_common(parser: argparse.ArgumentParser) -> None:
    from chatrpc.logs import LOG_FORMATS

    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default: %(default)s)")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line with the access line's counts as fields (default: %(default)s)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send OpenTelemetry traces to this OTLP/gRPC collector (e.g. http://127.0.0.1:4317); needs "
        "`pip install 'chatrpc[otel]'` (default: no tracing)",
    )


def _add_grpc_flags(parser: argparse.ArgumentParser, *, host_flag: str, port_flag: str) -> None:
    from service.engine_settings import EngineSettings

    engine = EngineSettings()
    group = parser.add_argument_group("gRPC service")
    group.add_argument(
        host_flag,
        dest="grpc_host",
        default="127.0.0.1",
        help="address the gRPC server listens on (default: %(default)s)",
    )
    group.add_argument(
        port_flag, dest="grpc_port", type=int, default=50051, help="port of the gRPC server (default: %(default)s)"
    )
    group.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="serve the GGUF file PATH as model ID; repeatable. PATH '@embedded' is the embedded GGUF. Append "
        "',tools=off' and/or ',json=off' to refuse tools or JSON response formats on that model. The embedded "
        "gemma-3-270m is served too unless --no-default-model",
    )
    group.add_argument("--no-default-model", action="store_true", help="do not serve the embedded gemma-3-270m")
    group.add_argument(
        "--api-key-file",
        help="file with one API key per line, added to those in $CHATRPC_API_KEYS (comma-separated). "
        "Clients send 'authorization: Bearer KEY'. With no keys the server is open and binds loopback only",
    )
    group.add_argument("--insecure", action="store_true", help="allow a non-loopback address without API keys")
    group.add_argument(
        "--metrics-port",
        type=_non_negative,
        default=9464,
        help="port of the service's Prometheus /metrics, on the gRPC server's address (0: none; default: %(default)s)",
    )
    group.add_argument(
        "--ctx-size",
        type=_positive,
        default=engine.context_per_sequence,
        help="context length of each sequence in tokens (default: %(default)s)",
    )
    group.add_argument(
        "--parallel",
        type=_positive,
        default=engine.max_sequences,
        help="sequences generated at once per model (default: %(default)s)",
    )
    group.add_argument(
        "--batch-size",
        type=_positive,
        default=engine.batch_size,
        help="most tokens in one decode step (default: %(default)s)",
    )
    group.add_argument(
        "--prefill-chunk",
        type=_positive,
        default=engine.prefill_chunk,
        help="prompt tokens per prefill chunk; one chunk per step while other sequences decode (default: %(default)s)",
    )
    group.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=engine.prefix_cache,
        help="keep the KV cache of finished requests' prompts and answers in their free slots, so that a request "
        "sharing a prefix (the next turn of a chat) prefills only the rest; output is the same either way "
        "(default: on)",
    )
    group.add_argument(
        "--idle-prefill",
        action=argparse.BooleanOptionalAction,
        default=engine.idle_prefill,
        help="with --fast-nondeterministic: while no request runs, prefill again what finished requests generated, so "
        "that the next turn of a chat reuses its last answer's KV too (the default kernels reuse it as decoded); a "
        "request that arrives stops it within a graph node (default: on; needs --prefix-cache and flash attention)",
    )
    group.add_argument(
        "--fast-nondeterministic",
        dest="deterministic",
        action="store_false",
        help="let llama.cpp pick its kernels by a batch's shape (the tiled K-quant matmul from 8 rows, flash "
        "attention's split-KV and tiled paths, V cached as F16): a greedy or seeded answer may then change with "
        "what else runs beside it. By default it does not (docs/engine.md, 'Determinism'; docs/benchmarks.md "
        "measures what each costs)",
    )
    group.add_argument(
        "--flash-attn",
        dest="flash_attention",
        action=argparse.BooleanOptionalAction,
        default=engine.flash_attention,
        help="llama.cpp's flash attention kernel (default: on). Off, a row's logits depend on its sequence's other "
        "rows in a step, so speculation and idle prefill are off too and the prefix cache reuses whole chunks "
        "only (docs/engine.md, 'Flash attention')",
    )
    group.add_argument(
        "--speculative-tokens",
        type=_non_negative,
        default=engine.speculative_tokens,
        metavar="K",
        help="guess up to K next tokens of each decoding sequence by prompt lookup (the tokens that followed the "
        "latest earlier occurrence of its last few tokens) and check them in its next step, where the guesses' "
        "measured acceptance pays for the rows they add on this machine; sampling is unchanged, each guess that "
        "holds is a token for free. 0 turns it off; so does --no-flash-attn unless --fast-nondeterministic "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--speculative-ngram",
        type=_ngram_range,
        default=engine.speculative_ngram,
        metavar="MIN,MAX",
        help="lengths of the history's ending that prompt lookup searches for, longest first "
        f"(default: {engine.speculative_ngram[0]},{engine.speculative_ngram[1]})",
    )
    group.add_argument(
        "--max-n",
        type=_positive,
        default=engine.max_n,
        help="the largest 'n' (choices per request) accepted, and never more than --parallel (default: %(default)s)",
    )
    group.add_argument(
        "--max-waiting",
        type=_positive,
        default=engine.max_waiting,
        help="requests queued before RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    group.add_argument(
        "--max-inflight-per-key",
        type=_non_negative,
        default=engine.max_inflight_per_key,
        metavar="N",
        help="requests one API key may have waiting or running at once, per model, before RESOURCE_EXHAUSTED. Keys "
        "take turns at admission either way; set below --max-waiting, this also keeps one key's flood from filling "
        "the whole queue, which would refuse every other key (with no keys, all callers are one key; default: 0, "
        "no limit)",
    )
    group.add_argument(
        "--max-slots-per-key",
        type=_non_negative,
        default=None,
        metavar="N",
        help="sequence slots (of --parallel) that one API key's running requests may hold at once, per model; a "
        "request of more choices than N runs when its key holds none. A key at its cap keeps its turn, and a request "
        "of another key takes a free slot at once instead of waiting for one of the flood's requests to finish "
        "(default: --parallel minus 1 when two or more API keys are configured; otherwise 0, no cap)",
    )
    group.add_argument(
        "--handler-nice",
        type=_non_negative,
        default=10,
        metavar="N",
        help="nice value of every thread but the decoding ones once the models are loaded: receiving, checking and "
        "tokenizing requests (and, under `serve`, the REST adapter) never preempt a running decode step "
        "(service/cpu_priority.py; 0: all at the process's priority; default: %(default)s)",
    )
    group.add_argument(
        "--threads",
        type=_positive,
        default=engine.threads,
        help="CPU threads for llama.cpp (default: every CPU this process may run on)",
    )
    group.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds in-flight calls get to finish on shutdown (default: %(default)s)",
    )
    _add_connection_flags(parser)


# (flag, ConnectionSettings field, type, what it does): service/grpc_settings.py says why each exists.
_CONNECTION_FLAGS = (
    ("--keepalive-time", "keepalive_time", "positive seconds", "ping a connection quiet for this long"),
    (
        "--keepalive-timeout",
        "keepalive_timeout",
        "positive seconds",
        "close a connection whose ping has no answer after this long",
    ),
    (
        "--keepalive-min-client-interval",
        "min_client_ping_interval",
        "positive seconds",
        "a client pinging more often than this is told GOAWAY 'too_many_pings'",
    ),
    (
        "--max-connection-age",
        "max_connection_age",
        "seconds",
        "send GOAWAY to a connection this old, so that clients reconnect and reach replicas added since (gRPC adds "
        "jitter; 0: never)",
    ),
    (
        "--max-connection-age-grace",
        "max_connection_age_grace",
        "seconds",
        "how long calls running on a connection past its age may go on; must outlast the longest stream",
    ),
    (
        "--max-concurrent-streams",
        "max_concurrent_streams",
        "count",
        "calls one connection may have open at once (0: gRPC's default, no limit)",
    ),
)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    from service.grpc_settings import ConnectionSettings

    defaults = ConnectionSettings()
    group = parser.add_argument_group("gRPC connections", "keepalive, connection age, streams (grpc_settings.py)")
    kinds = {
        "positive seconds": (_positive_seconds, "SECONDS"),
        "seconds": (_non_negative_seconds, "SECONDS"),
        "count": (_non_negative, "N"),
    }
    for flag, field, kind, what in _CONNECTION_FLAGS:
        parse, metavar = kinds[kind]
        group.add_argument(
            flag,
            dest=field,
            type=parse,
            default=getattr(defaults, field),
            metavar=metavar,
            help=f"{what} (default: %(default)s)",
        )
    group.add_argument(
        "--keepalive-permit-without-calls",
        dest="permit_without_calls",
        action=argparse.BooleanOptionalAction,
        default=defaults.permit_without_calls,
        help="ping idle connections too, and accept clients' pings on them (default: on)",
    )


def connection_settings(args: argparse.Namespace):
    from dataclasses import fields

    from service.grpc_settings import ConnectionSettings

    return ConnectionSettings(**{field.name: getattr(args, field.name) for field in fields(ConnectionSettings)})


def _add_limit_flags(parser: argparse.ArgumentParser, *, service: bool) -> None:
    """The request limits (service/limits.py): the body size for the adapter, all of them for the service."""
    from service.limits import RequestLimits

    defaults = RequestLimits()
    group = parser.add_argument_group("request limits", "checked before the work each would cost; over one: 400/413")
    group.add_argument(
        "--max-request-bytes",
        type=_positive,
        default=defaults.max_request_bytes,
        metavar="BYTES",
        help="largest request: a REST body (413, refused before it is read) or a gRPC message "
        "(RESOURCE_EXHAUSTED) (default: %(default)s)",
    )
    if not service:
        return
    flags = (
        ("--max-messages", "max_messages", "messages in one request"),
        ("--max-stop-strings", "max_stop_strings", "strings in 'stop'"),
        ("--max-stop-length", "max_stop_length", "characters in one stop string"),
        ("--max-tools", "max_tools", "functions in 'tools'"),
        (
            "--max-schema-bytes",
            "max_schema_bytes",
            "bytes of JSON schema (tools' parameters and response_format together)",
        ),
        ("--max-logit-bias", "max_logit_bias", "entries in 'logit_bias'"),
    )
    for flag, name, what in flags:
        group.add_argument(
            flag,
            dest=name,
            type=_positive,
            default=getattr(defaults, name),
            metavar="N",
            help=f"most {what} (default: %(default)s)",
        )


def request_limits(args: argparse.Namespace):
    from service.limits import RequestLimits

    return RequestLimits(
        max_request_bytes=args.max_request_bytes,
        max_messages=args.max_messages,
        max_stop_strings=args.max_stop_strings,
        max_stop_length=args.max_stop_length,
        max_tools=args.max_tools,
        max_schema_bytes=args.max_schema_bytes,
        max_logit_bias=args.max_logit_bias,
    )


def _at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive(text: str) -> int:
    return _at_least(1, text)


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {'at least 0' if allow_zero else 'above 0'}, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, allow_zero=False)


def _non_negative_seconds(text: str) -> float:
    return _seconds(text, allow_zero=True)


def _non_negative(text: str) -> int:
    return _at_least(0, text)


def _slots_per_key(given: int | None, parallel: int, keys: int) -> int:
    """--max-slots-per-key, or its default: with several keys, one slot kept for the keys that hold none."""
    if given is not None:
        return given
    return parallel - 1 if keys >= 2 and parallel >= 2 else 0


def _ngram_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _add_rest_flags(parser: argparse.ArgumentParser, *, host_flag: str, port_flag: str) -> None:
    group = parser.add_argument_group("REST adapter")
    group.add_argument(
        host_flag,
        dest="rest_host",
        default="127.0.0.1",
        help="address the REST adapter listens on (default: %(default)s)",
    )
    group.add_argument(
        port_flag, dest="rest_port", type=int, default=8000, help="port of the REST adapter (default: %(default)s)"
    )


def _pem_file(path: str):
    """A PEM file flag's value, read now: argparse names the flag when the file cannot be used."""
    from chatrpc.tls import PemFile, TLSFileError

    try:
        return PemFile.read(path)
    except TLSFileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_grpc_tls_flags(parser: argparse.ArgumentParser, *, prefix: str) -> None:
    """The gRPC server's certificate; `serve` names them --grpc-tls-*, as its --tls-* are the adapter's."""
    group = parser.add_argument_group("gRPC TLS", "the service's certificate, and client certificates (mTLS)")
    group.add_argument(
        f"{prefix}tls-cert",
        dest="grpc_tls_cert",
        type=_pem_file,
        metavar="FILE",
        help=f"PEM certificate chain of the gRPC server, which then speaks TLS only (needs {prefix}tls-key)",
    )
    group.add_argument(
        f"{prefix}tls-key", dest="grpc_tls_key", type=_pem_file, metavar="FILE", help="its PEM private key"
    )
    group.add_argument(
        f"{prefix}tls-client-ca",
        dest="grpc_tls_client_ca",
        type=_pem_file,
        metavar="FILE",
        help="require every client to present a certificate issued by this PEM CA (mTLS); a non-loopback address "
        "then needs no API keys",
    )


def _add_rest_tls_flags(parser: argparse.ArgumentParser) -> None:
    """The REST adapter's HTTPS certificate, and how it reaches a service that speaks TLS."""
    group = parser.add_argument_group("REST TLS", "the adapter's HTTPS certificate")
    group.add_argument(
        "--tls-cert",
        dest="rest_tls_cert",
        type=_pem_file,
        metavar="FILE",
        help="PEM certificate chain of the REST adapter, which then serves HTTPS only (needs --tls-key)",
    )
    group.add_argument("--tls-key", dest="rest_tls_key", type=_pem_file, metavar="FILE", help="its PEM private key")
    group = parser.add_argument_group("REST adapter to gRPC service", "TLS and mTLS on the adapter's channel")
    group.add_argument(
        "--upstream-ca",
        type=_pem_file,
        metavar="FILE",
        help="reach the gRPC service over TLS, trusting the PEM CA that issued its certificate",
    )
    group.add_argument(
        "--upstream-cert",
        type=_pem_file,
        metavar="FILE",
        help="PEM client certificate chain the adapter presents to a service that requires one (mTLS)",
    )
    group.add_argument("--upstream-key", type=_pem_file, metavar="FILE", help="its PEM private key")
    group.add_argument(
        "--upstream-server-name",
        metavar="NAME",
        help="the name the service's certificate must carry, when it is not the upstream's host (an IP address "
        "dialled, a certificate issued to a DNS name)",
    )


def _check_tls_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The TLS flags that mean something only together: a usage error before anything starts."""
    grpc_prefix = "--grpc-" if args.command == "serve" else "--"
    # (the flag given, its value, the flag it needs, that flag's value, why, where it is not evident)
    needs: list[tuple[str, object, str, object, str]] = []
    if args.command in ("serve", "grpc"):
        cert, key, client_ca = f"{grpc_prefix}tls-cert", f"{grpc_prefix}tls-key", f"{grpc_prefix}tls-client-ca"
        needs += [
            (cert, args.grpc_tls_cert, key, args.grpc_tls_key, ""),
            (key, args.grpc_tls_key, cert, args.grpc_tls_cert, ""),
            (client_ca, args.grpc_tls_client_ca, cert, args.grpc_tls_cert, ""),
        ]
    if args.command in ("serve", "rest"):
        needs += [
            ("--tls-cert", args.rest_tls_cert, "--tls-key", args.rest_tls_key, ""),
            ("--tls-key", args.rest_tls_key, "--tls-cert", args.rest_tls_cert, ""),
            ("--upstream-cert", args.upstream_cert, "--upstream-key", args.upstream_key, ""),
            ("--upstream-key", args.upstream_key, "--upstream-cert", args.upstream_cert, ""),
            ("--upstream-cert", args.upstream_cert, "--upstream-ca", args.upstream_ca, ""),
            ("--upstream-server-name", args.upstream_server_name, "--upstream-ca", args.upstream_ca, ""),
        ]
    if args.command == "serve":
        needs += [
            (
                "--grpc-tls-cert",
                args.grpc_tls_cert,
                "--upstream-ca",
                args.upstream_ca,
                ": the REST adapter must trust the CA that issued the service's certificate",
            ),
            (
                "--upstream-ca",
                args.upstream_ca,
                "--grpc-tls-cert",
                args.grpc_tls_cert,
                ": without it the service speaks plaintext",
            ),
            (
                "--grpc-tls-client-ca",
                args.grpc_tls_client_ca,
                "--upstream-cert",
                args.upstream_cert,
                ": the REST adapter must present a client certificate to the service",
            ),
        ]
    for flag, value, needed, needed_value, why in needs:
        if value is not None and needed_value is None:
            parser.error(f"{flag} needs {needed}{why}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatrpc", description="A self-hosted Chat Completions server on local GGUF models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC service and the REST adapter together")
    _add_common(serve)
    _add_grpc_flags(serve, host_flag="--grpc-host", port_flag="--grpc-port")
    _add_rest_flags(serve, host_flag="--host", port_flag="--port")
    _add_grpc_tls_flags(serve, prefix="--grpc-")
    _add_rest_tls_flags(serve)
    _add_limit_flags(serve, service=True)

    grpc_only = commands.add_parser("grpc", help="run the gRPC service alone")
    _add_common(grpc_only)
    _add_grpc_flags(grpc_only, host_flag="--host", port_flag="--port")
    _add_grpc_tls_flags(grpc_only, prefix="--")
    _add_limit_flags(grpc_only, service=True)

    rest = commands.add_parser("rest", help="run the REST adapter alone, in front of a gRPC service")
    _add_common(rest)
    _add_rest_flags(rest, host_flag="--host", port_flag="--port")
    rest.add_argument(
        "--upstream",
        default="127.0.0.1:50051",
        metavar="TARGET",
        help="the gRPC service: HOST:PORT, or any gRPC target naming several replicas (dns:///NAME:PORT, "
        "ipv4:HOST:PORT,HOST:PORT) (default: %(default)s)",
    )
    from adapters.rest.routing import Routing

    rest.add_argument(
        "--routing",
        choices=[policy.value for policy in Routing],
        default=Routing.PREFIX.value,
        help="how each call picks a healthy replica: 'prefix' sends every turn of a chat (by a hash of its beginning, "
        "or its X-Session-Id) to the same one, whose prefix cache holds the chat; 'round-robin' takes them in turn "
        "(default: %(default)s)",
    )
    rest.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address in front of a service that needs no key"
    )
    _add_rest_tls_flags(rest)
    _add_limit_flags(rest, service=False)
    return parser


def _run_grpc(args: argparse.Namespace, on_ready=None) -> None:
    from service.auth import keys_from_environment
    from service.bind_policy import check_bind_is_safe
    from service.cpu_priority import lower_all_threads_but
    from service.engine_settings import EngineSettings
    from service.models import DEFAULT_MODEL_ID, ModelRegistry, ModelSpec
    from service.server import GrpcServerConfig, serve

    keys = keys_from_environment(args.api_key_file)
    tls = _grpc_server_tls(args)
    mtls = tls is not None and tls.client_certificates_required
    check_bind_is_safe(args.grpc_host, keys, args.insecure, client_certificates=mtls)
    specs = [] if args.no_default_model else [ModelSpec(DEFAULT_MODEL_ID)]
    specs += [ModelSpec.parse(text) for text in args.models]
    if not specs:
        raise SystemExit("chatrpc: no model to serve (--no-default-model and no --model)")
    settings = EngineSettings(
        context_per_sequence=args.ctx_size,
        max_sequences=args.parallel,
        batch_size=args.batch_size,
        prefill_chunk=args.prefill_chunk,
        max_waiting=args.max_waiting,
        max_inflight_per_key=args.max_inflight_per_key,
        max_slots_per_key=_slots_per_key(args.max_slots_per_key, args.parallel, len(keys)),
        threads=args.threads,
        max_n=args.max_n,
        prefix_cache=args.prefix_cache,
        idle_prefill=args.idle_prefill,
        deterministic=args.deterministic,
        flash_attention=args.flash_attention,
        speculative_tokens=args.speculative_tokens,
        speculative_ngram=args.speculative_ngram,
    )
    registry = ModelRegistry(specs, settings)
    lower_all_threads_but(registry.decode_threads(), args.handler_nice)
    config = GrpcServerConfig(
        host=args.grpc_host,
        port=args.grpc_port,
        api_keys=tuple(keys),
        insecure=args.insecure,
        grace_seconds=args.grace,
        limits=request_limits(args),
        connection=connection_settings(args),
        tls=tls,
        metrics_port=args.metrics_port,
    )

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve(registry, config, ready=ready))
        await ready.wait()
        if on_ready is not None:
            on_ready()
        await task

    asyncio.run(main())


def _grpc_server_tls(args: argparse.Namespace):
    """The gRPC server's TLS credentials (chatrpc/tls.py) from its flags; None: plaintext."""
    if args.grpc_tls_cert is None:
        return None
    from chatrpc.tls import ServerTLS

    return ServerTLS.from_pem(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)


def _upstream_tls(args: argparse.Namespace):
    """The REST adapter's TLS credentials for the gRPC service; None: plaintext."""
    if args.upstream_ca is None:
        return None
    from chatrpc.tls import ChannelTLS

    return ChannelTLS.from_pem(args.upstream_ca, args.upstream_cert, args.upstream_key, args.upstream_server_name)


def _check_rest_certificate(args: argparse.Namespace) -> None:
    """uvicorn loads the adapter's HTTPS certificate itself, with a traceback for a wrong one."""
    if args.rest_tls_cert is not None:
        from chatrpc.tls import check_key_pair

        check_key_pair(args.rest_tls_cert, args.rest_tls_key)


_UPSTREAM_WAIT_SECONDS = 60


def _rest_upstream_is_open(upstream: str, tls=None) -> bool:
    """Whether the gRPC service answers without a key (then the adapter must stay on loopback), asked
    with the adapter's own TLS credentials (`tls`, chatrpc/tls.py): a client certificate lets it in
    as a key would."""
    import grpc

    from chatrpc.v1 import chat_pb2, chat_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(upstream)
    else:
        channel = grpc.secure_channel(upstream, tls.credentials, options=list(tls.options))
    with channel:
        try:
            # Waits a while for the service to come up: adapters and replicas start together (a
            # Kubernetes rollout), and one that cannot be asked counts as open.
            stub = chat_pb2_grpc.ChatCompletionsStub(channel)
            stub.ListModels(chat_pb2.ListModelsRequest(), timeout=_UPSTREAM_WAIT_SECONDS, wait_for_ready=True)
            return True
        except grpc.RpcError as error:
            return error.code() != grpc.StatusCode.UNAUTHENTICATED


def _run_rest(args: argparse.Namespace) -> None:
    from adapters.rest.app import run
    from adapters.rest.routing import Routing
    from service.bind_policy import is_loopback_host

    _check_rest_certificate(args)
    upstream_tls = _upstream_tls(args)
    exposed = not is_loopback_host(args.rest_host) and not args.insecure
    if exposed and _rest_upstream_is_open(args.upstream, upstream_tls):
        raise SystemExit(
            f"chatrpc: refusing to listen on {args.rest_host}: the upstream {args.upstream} needs no API key "
            "(or cannot be reached); configure keys there or pass --insecure"
        )
    run(
        args.rest_host,
        args.rest_port,
        args.upstream,
        max_request_bytes=args.max_request_bytes,
        log_level=args.log_level,
        upstream_tls=upstream_tls,
        ssl_certfile=None if args.rest_tls_cert is None else args.rest_tls_cert.path,
        ssl_keyfile=None if args.rest_tls_key is None else args.rest_tls_key.path,
        routing=Routing(args.routing),
    )


def _serve(args: argparse.Namespace) -> None:
    """gRPC in this process; the REST adapter in a child process started once gRPC is up."""
    from service.auth import keys_from_environment
    from service.bind_policy import check_bind_is_safe

    # The adapter exposes the service: the same loopback rule applies to its address.
    check_bind_is_safe(args.rest_host, keys_from_environment(args.api_key_file), args.insecure)
    # The adapter's files are checked now too: it starts only once the models have loaded.
    _check_rest_certificate(args)
    _upstream_tls(args)
    upstream_host = "127.0.0.1" if args.grpc_host in ("0.0.0.0", "::", "[::]") else args.grpc_host
    adapter_files = {
        "--tls-cert": args.rest_tls_cert,
        "--tls-key": args.rest_tls_key,
        "--upstream-ca": args.upstream_ca,
        "--upstream-cert": args.upstream_cert,
        "--upstream-key": args.upstream_key,
    }
    adapter_tls_flags = [text for flag, pem in adapter_files.items() if pem is not None for text in (flag, pem.path)]
    if args.upstream_server_name is not None:
        adapter_tls_flags += ["--upstream-server-name", args.upstream_server_name]
    scheme = "http" if args.rest_tls_cert is None else "https"
    child: list[subprocess.Popen] = []

    def start_rest() -> None:
        command = [
            sys.executable, "-m", "chatrpc", "rest",
            "--host", args.rest_host, "--port", str(args.rest_port),
            "--upstream", f"{upstream_host}:{args.grpc_port}", "--log-level", args.log_level,
            "--log-format", args.log_format, "--insecure",
            "--max-request-bytes", str(args.max_request_bytes), *adapter_tls_flags,
        ]  # fmt: skip
        if args.otlp_endpoint is not None:
            command += ["--otlp-endpoint", args.otlp_endpoint]
        child.append(subprocess.Popen(command, env=os.environ.copy()))
        log.warning("REST adapter starting on %s://%s:%d/v1", scheme, args.rest_host, args.rest_port)

    try:
        _run_grpc(args, on_ready=start_rest)
    finally:
        for process in child:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_tls_flags(parser, args)
    from chatrpc.logs import configure

    configure(args.log_level, args.log_format)
    from chatrpc import tracing

    tracing.configure("chatrpc-rest" if args.command == "rest" else "chatrpc", args.otlp_endpoint)
    if args.command != "rest":
        from service.engine.openmp import bind_decode_threads

        bind_decode_threads(args.threads)  # before anything loads llama.cpp
    from chatrpc.tls import TLSFileError
    from service.bind_policy import InsecureBindError

    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "grpc":
            _run_grpc(args)
        else:
            _run_rest(args)
    except (InsecureBindError, TLSFileError) as error:
        raise SystemExit(f"chatrpc: {error}") from None
