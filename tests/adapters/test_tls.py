"""TLS on both of the REST adapter's hops, with certificates made at test time by trustme: HTTPS to
its clients (`--tls-cert/--tls-key`), and mTLS to the gRPC service (`--upstream-ca`, and
`--upstream-cert/--upstream-key` for a service started with `--tls-client-ca`).

The official `openai` SDK trusting the CA gets completions over HTTPS; a client that does not trust it
is refused. An adapter without the client certificate cannot reach the service, and says so at once
with an error envelope. The adapter's start-up check of whether the service needs a key speaks TLS
too. `chatrpc serve` passes its TLS flags to the adapter it starts.
"""

from __future__ import annotations

import os
import time

import grpc
import httpx
import openai
import pytest

from chatrpc.local_server import (
    GRPC_HEALTH_SCHEME,
    LOOPBACK,
    LocalServer,
    free_port,
    grpc_command,
    rest_command,
    serve_command,
)
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import API_KEY, CTX_SIZE, MODEL_ID, REPO
from tests.tls_certificates import Certificates, make_certificates

SERVICE_FLAGS = ("--parallel", "2", "--ctx-size", str(CTX_SIZE))
CALL_TIMEOUT = 120  # seconds: a short completion on a loaded machine
# The adapter answers a call it cannot make at once (the channel is in TRANSIENT_FAILURE); the bound
# leaves room for a loaded machine and still tells an answer from a hang.
REFUSAL_WITHIN = 10.0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def open_env() -> dict[str, str]:
    """No API keys: a service lets in whoever presents a client certificate."""
    return {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}


def keyed_env() -> dict[str, str]:
    """An API key on the service, so that an adapter may listen beyond loopback in front of it."""
    return {**open_env(), "CHATRPC_API_KEYS": API_KEY}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("tls-logs")


@pytest.fixture(scope="module")
def mtls_service_port(certificates, log_dir):
    """`chatrpc grpc` requiring client certificates from the test CA, and an API key."""
    port = free_port()
    flags = (*SERVICE_FLAGS, *certificates.server_flags(), "--tls-client-ca", str(certificates.ca))
    health = f"{GRPC_HEALTH_SCHEME}{LOOPBACK}:{port}"
    service = LocalServer(
        "service",
        grpc_command(port, *flags),
        health,
        log_dir / "service.log",
        env=keyed_env(),
        cwd=REPO,
        grpc_credentials=certificates.grpc_credentials(),
    )
    service.wait_ready()
    yield port
    service.stop()


def start_adapter(name: str, upstream_port: int, log_dir, *flags: str, https_context=None) -> tuple[LocalServer, str]:
    """`chatrpc rest` in front of the service; its base URL (https when `https_context` is given)."""
    port = free_port()
    base = f"{'http' if https_context is None else 'https'}://{LOOPBACK}:{port}"
    adapter = LocalServer(
        name,
        rest_command(port, upstream_port, *flags),
        f"{base}/health/live",
        log_dir / f"{name}.log",
        env=open_env(),
        cwd=REPO,
        ssl_context=https_context,
    )
    adapter.wait_ready()
    return adapter, f"{base}/v1"


@pytest.fixture(scope="module")
def https_adapter_url(certificates, mtls_service_port, log_dir):
    """`chatrpc rest` over HTTPS, reaching the service over mTLS."""
    flags = ("--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key))
    adapter, base_url = start_adapter(
        "https-adapter",
        mtls_service_port,
        log_dir,
        *flags,
        *certificates.upstream_flags(),
        https_context=certificates.ssl_context(),
    )
    yield base_url
    adapter.stop()


def sdk_client(certificates: Certificates, base_url: str, api_key: str = API_KEY) -> openai.OpenAI:
    http_client = httpx.Client(verify=certificates.ssl_context(), timeout=CALL_TIMEOUT)
    return openai.OpenAI(base_url=base_url, api_key=api_key, http_client=http_client, max_retries=0)


def assert_sdk_completes(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=3)
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason


def test_sdk_over_https_gets_a_completion_and_a_stream(certificates, https_adapter_url):
    client = sdk_client(certificates, https_adapter_url)
    assert_sdk_completes(client)
    with client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=3, stream=True) as chunks:
        finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length"


def test_https_client_that_does_not_trust_the_ca_is_refused(https_adapter_url):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_adapter_url}/models", timeout=REFUSAL_WITHIN)


def test_adapter_ready_only_through_mtls(certificates, https_adapter_url):
    # /health/ready asks the service over the adapter's channel: SERVING means the mTLS hop works.
    answer = httpx.get(
        https_adapter_url.removesuffix("/v1") + "/health/ready", verify=certificates.ssl_context(), timeout=10
    )
    assert answer.status_code == 200, answer.text


def test_adapter_without_a_client_certificate_answers_503(certificates, mtls_service_port, log_dir):
    adapter, base_url = start_adapter(
        "adapter-without-cert", mtls_service_port, log_dir, *certificates.upstream_flags(client_certificate=False)
    )
    try:
        started = time.monotonic()
        answer = httpx.post(
            f"{base_url}/chat/completions",
            json={"model": MODEL_ID, "messages": QUESTION, "max_tokens": 3},
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=CALL_TIMEOUT,
        )
        assert time.monotonic() - started < REFUSAL_WITHIN
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "service_unavailable" and error["type"], error
        assert httpx.get(base_url.removesuffix("/v1") + "/health/ready", timeout=10).status_code == 503
    finally:
        adapter.stop()


def test_adapter_may_listen_beyond_loopback_in_front_of_a_keyed_tls_service(certificates, mtls_service_port, log_dir):
    # Its start-up check asks the service over mTLS and hears UNAUTHENTICATED: keys are needed.
    adapter, _ = start_adapter(
        "exposed-adapter", mtls_service_port, log_dir, "--host", "0.0.0.0", *certificates.upstream_flags()
    )
    adapter.stop()


def test_serve_with_tls_on_every_hop(certificates, log_dir):
    grpc_port, rest_port = free_port(), free_port()
    flags = (
        *SERVICE_FLAGS,
        *certificates.server_flags("--grpc-"),
        "--grpc-tls-client-ca", str(certificates.ca),
        *certificates.upstream_flags(),
        "--tls-cert", str(certificates.server_cert),
        "--tls-key", str(certificates.server_key),
    )  # fmt: skip
    server = LocalServer(
        "serve",
        serve_command(grpc_port, rest_port, *flags),
        f"https://{LOOPBACK}:{rest_port}/health/ready",
        log_dir / "serve.log",
        env=open_env(),
        cwd=REPO,
        ssl_context=certificates.ssl_context(),
    )
    try:
        server.wait_ready()
        assert_sdk_completes(sdk_client(certificates, f"https://{LOOPBACK}:{rest_port}/v1", api_key="x"))
        with grpc.secure_channel(f"{LOOPBACK}:{grpc_port}", certificates.grpc_credentials()) as channel:
            models = chat_pb2_grpc.ChatCompletionsStub(channel).ListModels(chat_pb2.ListModelsRequest(), timeout=30)
        assert MODEL_ID in [model.id for model in models.data]
    finally:
        server.stop()
