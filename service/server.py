"""The gRPC server: ChatCompletions, the standard health service and reflection, behind API keys.

With no API key configured the server is open, so it listens on loopback only unless the operator
says --insecure. On SIGTERM or SIGINT the health status goes NOT_SERVING first (so balancers stop
sending), then the server stops, giving in-flight calls `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatrpc.tls import ServerTLS
from chatrpc.v1 import chat_pb2
from service.auth import AuthInterceptor, Tenants
from service.bind_policy import check_bind_is_safe
from service.grpc_settings import ConnectionSettings
from service.limits import RequestLimits
from service.metrics import ServiceMetrics
from service.models import ModelRegistry
from service.request_decoding import decode_chat_request, decode_completion_request
from service.servicer import ChatCompletionsServicer

log = logging.getLogger(__name__)

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatCompletions"].full_name


@dataclass
class GrpcServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    api_keys: tuple[str, ...] = ()
    insecure: bool = False
    grace_seconds: float = 5.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    tls: ServerTLS | None = None  # None: plaintext
    metrics_port: int = 0  # /metrics over HTTP on `host` (0: not served)

    @property
    def client_certificates_required(self) -> bool:
        return self.tls is not None and self.tls.client_certificates_required


def _add_chat_service(servicer: ChatCompletionsServicer, server: grpc.aio.Server) -> None:
    """What chat_pb2_grpc.add_ChatCompletionsServicer_to_server does, but with the chat and text
    completion requests decoded by request_decoding.py, so that undecodable bytes are
    INVALID_ARGUMENT, not INTERNAL."""
    handlers = {
        "CreateChatCompletion": grpc.unary_unary_rpc_method_handler(
            servicer.CreateChatCompletion,
            request_deserializer=decode_chat_request,
            response_serializer=chat_pb2.ChatCompletion.SerializeToString,
        ),
        "StreamChatCompletion": grpc.unary_stream_rpc_method_handler(
            servicer.StreamChatCompletion,
            request_deserializer=decode_chat_request,
            response_serializer=chat_pb2.ChatCompletionChunk.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=chat_pb2.ListModelsRequest.FromString,
            response_serializer=chat_pb2.ModelList.SerializeToString,
        ),
        "CreateCompletion": grpc.unary_unary_rpc_method_handler(
            servicer.CreateCompletion,
            request_deserializer=decode_completion_request,
            response_serializer=chat_pb2.Completion.SerializeToString,
        ),
        "StreamCompletion": grpc.unary_stream_rpc_method_handler(
            servicer.StreamCompletion,
            request_deserializer=decode_completion_request,
            response_serializer=chat_pb2.Completion.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def serve(registry: ModelRegistry, config: GrpcServerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    check_bind_is_safe(
        config.host, list(config.api_keys), config.insecure, client_certificates=config.client_certificates_required
    )
    metrics = ServiceMetrics(registry)
    servicer = ChatCompletionsServicer(registry, config.limits, tenants=Tenants(config.api_keys), metrics=metrics)
    interceptors = [AuthInterceptor(config.api_keys, servicer.call_ended)] if config.api_keys else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # Refused before it is decoded: the one size check that needs no field of the request.
            ("grpc.max_receive_message_length", config.limits.max_request_bytes),
            ("grpc.so_reuseport", 0),
            *config.connection.server_options(),
        ],
    )
    _add_chat_service(servicer, server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(service_names, server)

    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    if config.tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, config.tls.credentials)
    if bound == 0:
        raise OSError(f"could not listen on {address}")
    await server.start()
    if config.metrics_port:
        metrics.serve(config.host, config.metrics_port, config.tls)
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
