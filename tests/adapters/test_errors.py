"""The gRPC status -> HTTP error mapping of the REST adapter."""

from __future__ import annotations

import json

import grpc
import pytest

from adapters.rest.errors import APIError, from_rpc_error


def rpc_error(code: grpc.StatusCode, details: str = "boom", trailing=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


@pytest.mark.parametrize(
    ("code", "status", "error_type", "error_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", None),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error", None),
        (grpc.StatusCode.OUT_OF_RANGE, 400, "invalid_request_error", None),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "invalid_request_error", "permission_denied"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "model_not_found"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "rate_limit_exceeded"),
        (grpc.StatusCode.UNIMPLEMENTED, 501, "invalid_request_error", "unsupported"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error", "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "timeout"),
        (grpc.StatusCode.INTERNAL, 500, "server_error", None),
        (grpc.StatusCode.UNKNOWN, 500, "server_error", None),
        (grpc.StatusCode.DATA_LOSS, 500, "server_error", None),
        (grpc.StatusCode.ABORTED, 500, "server_error", None),
    ],
)
def test_status_mapping(code, status, error_type, error_code):
    error = from_rpc_error(rpc_error(code, "what happened"))
    assert (error.status, error.type, error.code) == (status, error_type, error_code)
    if code is not grpc.StatusCode.UNAVAILABLE:  # its own message: the next test
        assert error.message == "what happened"
    assert error.param is None


def test_an_unreachable_upstream_is_a_503_that_does_not_name_its_address():
    details = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:50051: Connection refused"
    error = from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details))
    assert (error.status, error.code, error.retry_after) == (503, "service_unavailable", 1)
    assert "10.1.2.3" not in error.to_json().decode() and "50051" not in error.to_json().decode()
    assert "unavailable" in error.message


def test_error_param_from_trailing_metadata():
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in [0, 2]", [("error-param", "temperature")])
    )
    assert error.to_dict() == {
        "error": {
            "message": "temperature must be in [0, 2]",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }


def test_error_param_with_a_path_and_other_metadata():
    error = from_rpc_error(
        rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad content",
            [("x-request-id", "r1"), ("error-param", "messages[2].content")],
        )
    )
    assert error.param == "messages[2].content"


def test_oversized_message_is_413_not_a_rate_limit():
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)")
    )
    assert (error.status, error.code) == (413, "request_too_large")


def test_empty_details_fall_back_to_the_status_name():
    assert from_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, "")).message == "INTERNAL"


def test_envelope_json():
    error = APIError(404, "The model 'x' does not exist", param="model", code="model_not_found")
    assert json.loads(error.to_json()) == {
        "error": {
            "message": "The model 'x' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    response = error.to_response({"x-request-id": "r"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "r"


@pytest.mark.parametrize(
    ("code", "retry_after"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "1"),  # the queue is full
        (grpc.StatusCode.UNAVAILABLE, "1"),  # the service is away or shutting down
        (grpc.StatusCode.INVALID_ARGUMENT, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None),
        (grpc.StatusCode.INTERNAL, None),
    ],
)
def test_retry_after_only_when_retrying_can_help(code, retry_after):
    response = from_rpc_error(rpc_error(code)).to_response({"x-request-id": "r"})
    assert response.headers.get("retry-after") == retry_after
    assert response.headers["x-request-id"] == "r"


def test_oversized_message_has_no_retry_after():
    error = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 8)"))
    assert "retry-after" not in error.to_response().headers
