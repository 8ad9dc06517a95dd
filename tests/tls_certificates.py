"""Certificates made at test time with trustme, written as PEM files for the TLS and mTLS tests: a CA,
a server certificate it issued for the loopback address, and a client certificate it issued; plus a
client certificate from another CA, which a server requiring client certificates must refuse."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme

SERVER_NAMES = ("127.0.0.1", "localhost")
CLIENT_NAME = "client.chatrpc.test"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the servers do not trust
    stranger_key: Path

    def server_flags(self, prefix: str = "--") -> tuple[str, ...]:
        """The gRPC server's certificate flags (`prefix` "--grpc-" under `chatrpc serve`)."""
        return (f"{prefix}tls-cert", str(self.server_cert), f"{prefix}tls-key", str(self.server_key))

    def upstream_flags(self, *, client_certificate: bool = True) -> tuple[str, ...]:
        """The REST adapter's flags that reach the service over TLS, with mTLS's client certificate."""
        flags = ("--upstream-ca", str(self.ca))
        if client_certificate:
            flags += ("--upstream-cert", str(self.client_cert), "--upstream-key", str(self.client_key))
        return flags

    def grpc_credentials(self, *, client_certificate: bool = True, stranger: bool = False) -> grpc.ChannelCredentials:
        """A gRPC client that trusts the CA, presenting the client certificate (or the stranger's, or none)."""
        cert, key = (self.stranger_cert, self.stranger_key) if stranger else (self.client_cert, self.client_key)
        if not client_certificate:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client's context that trusts the CA."""
        return ssl.create_default_context(cafile=str(self.ca))


def make_certificates(directory: Path) -> Certificates:
    ca, stranger_ca = trustme.CA(), trustme.CA()
    server, client = ca.issue_cert(*SERVER_NAMES), ca.issue_cert(CLIENT_NAME)
    stranger = stranger_ca.issue_cert(CLIENT_NAME)

    def write(name: str, blobs) -> Path:
        path = directory / name
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
        return path

    return Certificates(
        ca=write("ca.pem", [ca.cert_pem]),
        server_cert=write("server.pem", server.cert_chain_pems),
        server_key=write("server-key.pem", [server.private_key_pem]),
        client_cert=write("client.pem", client.cert_chain_pems),
        client_key=write("client-key.pem", [client.private_key_pem]),
        stranger_cert=write("stranger.pem", stranger.cert_chain_pems),
        stranger_key=write("stranger-key.pem", [stranger.private_key_pem]),
    )
