"""The gRPC server: ChatCompletions, the standard health service and reflection, behind API keys.

With no API key configured the server is open, so it listens on loopback only unless the operator
says --insecure. On SIGTERM or SIGINT the health status goes NOT_SERVING first (so balancers stop
sending), then the server stops, giving in-flight calls `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service.auth import AuthInterceptor
from service.models import ModelRegistry
from service.servicer import ChatCompletionsServicer

log = logging.getLogger(__name__)

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatCompletions"].full_name


class InsecureBindError(Exception):
    """Binding a non-loopback address with no API keys, without --insecure."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_is_safe(host: str, api_keys: list[str], insecure: bool) -> None:
    if not api_keys and not insecure and not is_loopback_host(host):
        raise InsecureBindError(
            f"refusing to listen on {host} without API keys: set CHATRPC_API_KEYS or --api-key-file, "
            "bind a loopback address, or pass --insecure"
        )


@dataclass
class GrpcServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    api_keys: tuple[str, ...] = ()
    insecure: bool = False
    grace_seconds: float = 5.0


async def serve(registry: ModelRegistry, config: GrpcServerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    check_bind_is_safe(config.host, list(config.api_keys), config.insecure)
    interceptors = [AuthInterceptor(config.api_keys)] if config.api_keys else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    chat_pb2_grpc.add_ChatCompletionsServicer_to_server(ChatCompletionsServicer(registry), server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(service_names, server)

    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.warning("gRPC server listening on %s (%s)", address, "API keys required" if config.api_keys else "no API keys")
    if ready is not None:
        ready.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.warning("shutting down: health NOT_SERVING, then %.1fs grace for in-flight calls", config.grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_seconds)
    registry.close()
