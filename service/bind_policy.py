"""Which addresses a server may listen on: with no API keys, loopback only, unless the operator
passes --insecure. Both servers check it (the gRPC service and the REST adapter), and the REST
adapter's process imports nothing of the engine for it. A gRPC server that requires client
certificates (mTLS) lets in only the holders of one, as API keys would; the REST adapter has none."""

from __future__ import annotations

import ipaddress


class InsecureBindError(Exception):
    """Binding a non-loopback address with no API keys, without --insecure."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_is_safe(host: str, api_keys: list[str], insecure: bool, *, client_certificates: bool = False) -> None:
    if not api_keys and not client_certificates and not insecure and not is_loopback_host(host):
        raise InsecureBindError(
            f"refusing to listen on {host} with neither API keys nor client certificates: set CHATRPC_API_KEYS or "
            "--api-key-file, require client certificates (mTLS, gRPC only: --tls-client-ca, --grpc-tls-client-ca "
            "under serve), bind a loopback address, or pass --insecure"
        )
