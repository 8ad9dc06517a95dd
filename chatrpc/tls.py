"""TLS on every hop, from PEM files: the gRPC service's certificate (and, with a client CA, the client
certificates it then requires: mTLS), and the credentials with which the REST adapter reaches a
service that speaks TLS. The REST adapter's own HTTPS certificate goes to uvicorn, which takes
paths; it is checked here the same way.

Every file is read and checked once, at start-up: a missing file, one that is not PEM, or a key that
is not the certificate's stops the command with a message naming the file, before a model loads,
instead of failing every handshake later with an error that names nothing. The REST adapter's
process uses this module too, so it imports nothing of the engine.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

_PEM_BEGIN = b"-----BEGIN "
# The name the service's certificate is checked against instead of the host dialled: a certificate
# issued to a DNS name, reached at an IP address.
_TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"
# gRPC cannot use an encrypted private key: one is refused here rather than prompted for.
_NO_PASSWORD = b""


class TLSFileError(Exception):
    """A PEM file that cannot serve: unreadable, not PEM, or a key that is not its certificate's."""


@dataclass(frozen=True)
class PemFile:
    """A PEM file named on the command line, read once."""

    path: str
    data: bytes

    @classmethod
    def read(cls, path: str) -> PemFile:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise TLSFileError(f"cannot read {path}: {error.strerror or error}") from None
        if _PEM_BEGIN not in data:
            raise TLSFileError(f"{path} is not a PEM file (it has no '-----BEGIN' line)")
        return cls(path, data)


def check_key_pair(cert: PemFile, key: PemFile) -> None:
    """That ``key`` is the unencrypted private key of the first certificate in ``cert``."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert.path, key.path, password=_NO_PASSWORD)
    except (ssl.SSLError, OSError) as error:
        raise TLSFileError(
            f"{cert.path} and {key.path} are not a certificate chain and its unencrypted private key ({error})"
        ) from None


def check_ca(ca: PemFile) -> None:
    """That ``ca`` holds certificates a TLS peer can be checked against."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca.data.decode("ascii"))
    except (ssl.SSLError, ValueError) as error:
        raise TLSFileError(f"{ca.path} holds no usable CA certificate ({error})") from None


@dataclass(frozen=True)
class ServerTLS:
    """The gRPC server's credentials. With a client CA the server requires every client to present a
    certificate that CA issued (mTLS), and refuses the connection of one that does not."""

    credentials: grpc.ServerCredentials
    client_certificates_required: bool
    # The files themselves, for the service's /metrics server (service/metrics.py), which speaks
    # the same TLS as gRPC.
    cert: PemFile
    key: PemFile
    client_ca: PemFile | None = None

    @classmethod
    def from_pem(cls, cert: PemFile, key: PemFile, client_ca: PemFile | None = None) -> ServerTLS:
        check_key_pair(cert, key)
        if client_ca is not None:
            check_ca(client_ca)
        credentials = grpc.ssl_server_credentials(
            [(key.data, cert.data)],
            root_certificates=None if client_ca is None else client_ca.data,
            require_client_auth=client_ca is not None,
        )
        return cls(credentials, client_ca is not None, cert, key, client_ca)


@dataclass(frozen=True)
class ChannelTLS:
    """How a client reaches a gRPC service over TLS: the CA that issued the service's certificate,
    the client's own certificate for mTLS (optional), and the channel options that go with them."""

    credentials: grpc.ChannelCredentials
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_pem(
        cls,
        ca: PemFile,
        cert: PemFile | None = None,
        key: PemFile | None = None,
        server_name: str | None = None,
    ) -> ChannelTLS:
        check_ca(ca)
        if cert is not None and key is not None:
            check_key_pair(cert, key)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.data,
            private_key=None if key is None else key.data,
            certificate_chain=None if cert is None else cert.data,
        )
        options = () if server_name is None else ((_TARGET_NAME_OVERRIDE, server_name),)
        return cls(credentials, options)
