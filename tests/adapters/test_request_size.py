"""A body over --max-request-bytes is refused with 413 before it is read, and the server serves on.

The requests are written on a raw socket, so that the test controls what is sent and when: a
declared length over the limit is answered without a byte of the body being sent, and a chunked
body is answered once the limit is passed, while the client is still sending.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from service.limits import RequestLimits

LIMIT = RequestLimits().max_request_bytes  # the test server runs with the default


def _connect(server) -> socket.socket:
    address = urlsplit(server.rest_base_url)
    connection = socket.create_connection((address.hostname, address.port), timeout=30)
    return connection


def _read_response(connection: socket.socket) -> tuple[int, dict]:
    """The status and the JSON body of one HTTP/1.1 response (read until the body is complete)."""
    data = b""
    deadline = time.monotonic() + 30
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        data += connection.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers["content-length"])
    while len(rest) < length and time.monotonic() < deadline:
        rest += connection.recv(65536)
    return status, json.loads(rest[:length])


def _head(server, extra: str) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _assert_too_large(status: int, payload: dict) -> None:
    assert status == 413, payload
    error = payload["error"]
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"]


def _assert_still_serving(server) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    response = httpx.get(f"{server.rest_base_url}/models", headers=headers, timeout=30)
    assert response.status_code == 200


def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(server):
    with _connect(server) as connection:
        connection.sendall(_head(server, "Content-Length: 20000000\r\n"))
        status, payload = _read_response(connection)
    _assert_too_large(status, payload)
    _assert_still_serving(server)


def test_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with _connect(server) as connection:
        connection.sendall(_head(server, "Transfer-Encoding: chunked\r\n"))
        # Sends up to twice the limit; the server answers once it has seen more than the limit and
        # stops reading, so the client may see its later writes fail.
        try:
            while sent < 2 * LIMIT:
                connection.sendall(frame)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, payload = _read_response(connection)
    _assert_too_large(status, payload)
    _assert_still_serving(server)


def test_body_just_within_the_limit_is_read(server):
    # A body of nearly LIMIT bytes is parsed and refused for what it says (its prompt cannot fit
    # the context), not for its size.
    filler = "a" * (LIMIT - 200)
    body = json.dumps({"model": "gemma-3-270m", "messages": [{"role": "user", "content": filler}]}).encode()
    assert len(body) <= LIMIT
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.rest_base_url}/chat/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "at least" in error["message"]


@pytest.mark.parametrize("declared", ["-1", "12abc"])
def test_content_length_that_is_not_a_number_is_refused(server, declared):
    with _connect(server) as connection:
        connection.sendall(_head(server, f"Content-Length: {declared}\r\n"))
        data = connection.recv(65536)
    # httptools itself refuses such a header before the adapter sees the request.
    assert data.startswith(b"HTTP/1.1 400")
    _assert_still_serving(server)
