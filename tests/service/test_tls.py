"""TLS and mTLS on the gRPC server (chatrpc/tls.py), with certificates made at test time by trustme.

With `--tls-cert/--tls-key`, a client that trusts the CA gets answers; one that does not, or one that
speaks plaintext, is refused. With `--tls-client-ca` as well, only a client presenting a certificate
that CA issued gets in, and the server may then listen beyond loopback with no API keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import grpc
import pytest

from chatrpc.local_server import GRPC_HEALTH_SCHEME, LOOPBACK, LocalServer, free_port, grpc_command
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service.bind_policy import InsecureBindError, check_bind_is_safe
from tests.conftest import CTX_SIZE, MODEL_ID, REPO
from tests.tls_certificates import Certificates, make_certificates

CALL_TIMEOUT = 120  # seconds: a short completion on a loaded machine
REFUSAL_TIMEOUT = 20  # seconds: a refused handshake fails at once; this only bounds a hang
SERVICE_FLAGS = ("--parallel", "2", "--ctx-size", str(CTX_SIZE))


def open_env() -> dict[str, str]:
    """No API keys: what lets a client in is the certificate alone."""
    return {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def start_service(certificates: Certificates, log_dir, *flags: str, host: str = LOOPBACK, client_cert: bool = False):
    port = free_port()
    command = grpc_command(port, "--host", host, *SERVICE_FLAGS, *certificates.server_flags(), *flags)
    target = f"{LOOPBACK}:{port}"
    credentials = certificates.grpc_credentials(client_certificate=client_cert)
    service = LocalServer(
        "service",
        command,
        GRPC_HEALTH_SCHEME + target,
        log_dir / f"service-{port}.log",
        env=open_env(),
        cwd=REPO,
        grpc_credentials=credentials,
    )
    service.wait_ready()
    return service, target


@pytest.fixture(scope="module")
def tls_target(certificates, tmp_path_factory):
    service, target = start_service(certificates, tmp_path_factory.mktemp("tls-service"))
    yield target
    service.stop()


@pytest.fixture(scope="module")
def mtls_service(certificates, tmp_path_factory):
    """The target and the /metrics port of a service requiring client certificates."""
    # Every address, with no API keys: allowed, since every client must present a certificate.
    metrics_port = free_port()
    service, target = start_service(
        certificates,
        tmp_path_factory.mktemp("mtls-service"),
        "--tls-client-ca",
        str(certificates.ca),
        "--metrics-port",
        str(metrics_port),
        host="0.0.0.0",
        client_cert=True,
    )
    yield target, metrics_port
    service.stop()


@pytest.fixture(scope="module")
def mtls_target(mtls_service):
    return mtls_service[0]


def list_models(channel: grpc.Channel, timeout: float = CALL_TIMEOUT) -> list[str]:
    answer = chat_pb2_grpc.ChatCompletionsStub(channel).ListModels(chat_pb2.ListModelsRequest(), timeout=timeout)
    return [model.id for model in answer.data]


def assert_refused(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        list_models(channel, timeout=REFUSAL_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


def test_client_that_trusts_the_ca_gets_models_and_a_completion(certificates, tls_target):
    credentials = certificates.grpc_credentials(client_certificate=False)
    with grpc.secure_channel(tls_target, credentials) as channel:
        assert MODEL_ID in list_models(channel)
        request = chat_pb2.ChatCompletionRequest(
            model=MODEL_ID, messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Hi")], max_tokens=3
        )
        answer = chat_pb2_grpc.ChatCompletionsStub(channel).CreateChatCompletion(request, timeout=CALL_TIMEOUT)
        assert answer.usage.completion_tokens >= 1


def test_client_that_does_not_trust_the_ca_is_refused(tls_target):
    # gRPC's own roots: the handshake fails on the server's certificate.
    with grpc.secure_channel(tls_target, grpc.ssl_channel_credentials()) as channel:
        assert_refused(channel)


def test_plaintext_client_is_refused(tls_target):
    with grpc.insecure_channel(tls_target) as channel:
        assert_refused(channel)


def test_mtls_client_with_a_certificate_gets_in(certificates, mtls_target):
    with grpc.secure_channel(mtls_target, certificates.grpc_credentials()) as channel:
        assert MODEL_ID in list_models(channel)


def test_mtls_client_without_a_certificate_is_refused(certificates, mtls_target):
    with grpc.secure_channel(mtls_target, certificates.grpc_credentials(client_certificate=False)) as channel:
        assert_refused(channel)


def test_mtls_client_with_a_certificate_of_another_ca_is_refused(certificates, mtls_target):
    with grpc.secure_channel(mtls_target, certificates.grpc_credentials(stranger=True)) as channel:
        assert_refused(channel)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_client_certificates_let_a_server_without_keys_bind_any_address(host):
    check_bind_is_safe(host, [], insecure=False, client_certificates=True)
    with pytest.raises(InsecureBindError, match="client certificates"):
        check_bind_is_safe(host, [], insecure=False, client_certificates=False)


def run_chatrpc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatrpc", *args], cwd=REPO, env=open_env(), capture_output=True, text=True, timeout=60
    )


def test_tls_without_client_certificates_still_refuses_a_non_loopback_address(certificates):
    result = run_chatrpc("grpc", "--host", "0.0.0.0", *certificates.server_flags())
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr, result.stderr


def test_certificate_without_key_is_a_usage_error(certificates):
    result = run_chatrpc("grpc", "--tls-cert", str(certificates.server_cert))
    assert result.returncode == 2 and "--tls-cert needs --tls-key" in result.stderr, result.stderr


def test_missing_file_names_its_flag_and_path(certificates, tmp_path):
    missing = tmp_path / "missing.pem"
    result = run_chatrpc("grpc", "--tls-cert", str(missing), "--tls-key", str(certificates.server_key))
    assert result.returncode == 2
    assert "--tls-cert" in result.stderr and str(missing) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_key_of_another_certificate_is_refused_at_start(certificates):
    result = run_chatrpc("grpc", "--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.client_key))
    assert result.returncode != 0
    assert str(certificates.server_cert) in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_mtls_metrics_need_a_client_certificate_too(certificates, mtls_service):
    """/metrics listens where gRPC does, so it speaks the same TLS: a scraper presents a certificate."""
    url = f"https://{LOOPBACK}:{mtls_service[1]}/metrics"
    scraper = certificates.ssl_context()
    scraper.load_cert_chain(certificates.client_cert, certificates.client_key)
    with urllib.request.urlopen(url, timeout=REFUSAL_TIMEOUT, context=scraper) as answer:
        assert b"chatrpc_requests_waiting" in answer.read()
    with pytest.raises(OSError):  # the handshake fails, or the server drops the connection after it
        urllib.request.urlopen(url, timeout=REFUSAL_TIMEOUT, context=certificates.ssl_context()).read()
    with pytest.raises(OSError):
        urllib.request.urlopen(url.replace("https:", "http:"), timeout=REFUSAL_TIMEOUT).read()
