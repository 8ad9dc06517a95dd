"""API-key authentication for every RPC, as a server interceptor.

Keys come from `CHATRPC_API_KEYS` (comma-separated) and/or a key file (one key per line). Clients
send `authorization: Bearer <key>` metadata. Keys are compared in constant time and never logged.
The standard health service stays open so that load balancers and probes need no key, and so does
reflection, which describes only the public API, so that `grpcurl list` works before a key is set.

The key a call came with also says whose request it is: `Tenants` names the tenant that fair
admission (service/engine/admission.py) queues it under, by the key's position in the configured
list, never by the key itself, so that no log, repr or error can carry a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from chatrpc.tracing import trace_headers
from chatrpc.v1.wire import AUTHORIZATION_METADATA_KEY
from service.access_log import CallRecord, request_id_of
from service.errors import Unauthenticated, abort_with

# Health checks are answered without a key, as orchestrators expect; reflection is the API's schema.
_OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# With no keys configured every caller is this one tenant.
SHARED_TENANT = "shared"


def load_api_keys(env_value: str | None, key_file: str | None) -> list[str]:
    """Collect keys from the environment's comma-separated list and a file of one key per line."""
    keys: list[str] = []
    if env_value:
        keys.extend(k.strip() for k in env_value.split(","))
    if key_file:
        keys.extend(line.strip() for line in Path(key_file).read_text().splitlines())
    return [k for k in keys if k and not k.startswith("#")]


def keys_from_environment(key_file: str | None = None) -> list[str]:
    return load_api_keys(os.environ.get("CHATRPC_API_KEYS"), key_file)


class ApiKeyChecker:
    """Checks a presented bearer token against the configured keys in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def is_valid(self, authorization: str | None) -> bool:
        return self.key_index(authorization) is not None

    def key_index(self, authorization: str | None) -> int | None:
        """The position of the presented key among the configured ones, or None if it is not one."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token.strip().encode()
        # Compare with every key, without stopping at a match, so timing reveals nothing.
        matched = None
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(presented, key) and matched is None:
                matched = index
        return matched


_REFUSED = Unauthenticated("Incorrect or missing API key: send 'authorization: Bearer <key>'.")


def authorization_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The call's `authorization` metadata value, if it has one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_METADATA_KEY:
            return value if isinstance(value, str) else None
    return None


class Tenants:
    """Whose request a call is, for fair admission: `key-I` for the I-th configured key (from 0), or
    SHARED_TENANT for everyone when no key is configured."""

    def __init__(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._checker = ApiKeyChecker(keys) if keys else None
        self._fingerprints = {_tenant(index): key_fingerprint(key) for index, key in enumerate(keys)}

    def of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        if self._checker is None:
            return SHARED_TENANT
        index = self._checker.key_index(authorization_of(metadata))
        if index is None:
            # The interceptor lets no such call through; should one come, it is nobody's to queue.
            raise Unauthenticated(_REFUSED.message)
        return _tenant(index)

    def fingerprint(self, tenant: str) -> str | None:
        """The fingerprint of the tenant's key (key_fingerprint), None with no keys configured."""
        return self._fingerprints.get(tenant)


def _tenant(index: int) -> str:
    return f"key-{index}"


def key_fingerprint(key: str) -> str:
    """What logs say instead of a key: the start of its SHA-256, the same on every replica and
    whatever the keys' order, from which the key cannot be recovered."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks unless it carries a valid bearer key."""

    def __init__(self, keys: Iterable[str], call_ended: Callable[[CallRecord], None] = CallRecord.emit) -> None:
        """`call_ended` gets the record of each call refused (the access line, the failure metric)."""
        self._checker = ApiKeyChecker(keys)
        self._call_ended = call_ended

        async def refuse(request, context):
            await abort_with(context, _REFUSED)

        self._refuse_unary = grpc.unary_unary_rpc_method_handler(refuse)

        async def refuse_stream(request, context):
            await abort_with(context, _REFUSED)
            yield  # pragma: no cover - makes this an async generator

        self._refuse_stream = grpc.unary_stream_rpc_method_handler(refuse_stream)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(_OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        if self._checker.is_valid(authorization_of(handler_call_details.invocation_metadata)):
            return await continuation(handler_call_details)
        # The servicer never sees this call, so its access line is written here (refusals in a
        # burst are how a guessed or leaked key shows in the logs).
        metadata = handler_call_details.invocation_metadata
        refused = CallRecord(request_id_of(metadata), method.rpartition("/")[2], trace_context=trace_headers(metadata))
        refused.status = _REFUSED.code.name
        refused.end()
        self._call_ended(refused)
        handler = await continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._refuse_stream
        return self._refuse_unary
