"""HTTP behaviour of the REST adapter that needs no running service.

Requests go through httpx's ASGITransport. Where the app needs its upstream channel, the lifespan
opens a real grpc.aio channel to a port where nothing listens, so every call fails as it would with
the service down. End-to-end tests against the real service live beside these once it exists.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from adapters.rest import create_app

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def client(*, with_lifespan: bool = False):
    app = create_app(f"127.0.0.1:{closed_port()}", max_request_bytes=1 << 20)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://adapter") as http:
        if with_lifespan:
            async with app.router.lifespan_context(app):
                yield http
        else:
            yield http


def assert_envelope(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize("content", [b"", b"not json", b"{'model': 'm'}", b"[1, 2]", b"null", b'"x"'])
async def test_body_that_is_not_a_json_object_is_400(content):
    async with client() as http:
        response = await http.post(CHAT, content=content, headers={"content-type": "application/json"})
    error = assert_envelope(response, 400)
    assert error["type"] == "invalid_request_error"


async def test_unknown_field_is_400_naming_it():
    async with client() as http:
        response = await http.post(CHAT, json={**BODY, "frobnicate": 1})
    error = assert_envelope(response, 400, param="frobnicate")
    assert error["message"] == "Unrecognized request argument supplied: frobnicate"


async def test_type_error_is_400_naming_the_field():
    async with client() as http:
        response = await http.post(CHAT, json={**BODY, "messages": [{"role": "user", "content": 5}]})
    error = assert_envelope(response, 400, param="messages[0].content")
    assert error["code"] == "invalid_type"


async def test_unknown_route_is_404_envelope():
    async with client() as http:
        response = await http.get("/v1/engines")
    error = assert_envelope(response, 404)
    assert error["message"] == "Invalid URL (GET /v1/engines)"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", CHAT), ("POST", "/v1/models"), ("DELETE", "/v1/models/m"), ("POST", "/health")]
)
async def test_wrong_method_is_405_envelope(method, path):
    async with client() as http:
        response = await http.request(method, path)
    assert_envelope(response, 405)
    assert "allow" in response.headers


async def test_request_id_is_echoed_or_made():
    async with client() as http:
        given = await http.post(CHAT, content=b"x", headers={"x-request-id": "req-42"})
        made = await http.post(CHAT, content=b"x")
    assert given.headers["x-request-id"] == "req-42"
    assert made.headers["x-request-id"].startswith("req_")


async def test_service_down_gives_503_for_every_route():
    async with client(with_lifespan=True) as http:
        health = await http.get("/health")
        unary = await http.post(CHAT, json=BODY)
        # An error before the first chunk is an ordinary HTTP error, not an event stream.
        stream = await http.post(CHAT, json={**BODY, "stream": True})
        models = await http.get("/v1/models")
        model = await http.get("/v1/models/google/gemma-3-270m")
    for response in (health, unary, stream, models, model):
        error = assert_envelope(response, 503)
        assert error["type"] == "server_error"


async def test_authorization_that_grpc_cannot_carry_is_401():
    async with client(with_lifespan=True) as http:
        response = await http.post(CHAT, json=BODY, headers={"authorization": "Bearer sk-\u00e9".encode("latin-1")})
    error = assert_envelope(response, 401)
    assert error["code"] == "invalid_api_key"
    assert "sk-" not in error["message"]


def test_module_entry_point_has_help():
    result = subprocess.run(
        [sys.executable, "-m", "adapters.rest", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for flag in ("--upstream", "--host", "--port", "--log-level"):
        assert flag in result.stdout
