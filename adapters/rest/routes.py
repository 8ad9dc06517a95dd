"""The HTTP endpoints: each reads the request, makes one gRPC call, and writes the answer.

Failures are raised as ``APIError`` and turned into the OpenAI envelope by the handlers at the
bottom, which ``app.py`` installs; so are unknown routes (404) and wrong methods (405).
"""

from __future__ import annotations

from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.rest.body import BodyReader
from adapters.rest.errors import RETRY_AFTER_SECONDS, APIError, internal_error, method_not_allowed, not_found_route
from adapters.rest.metrics import metrics
from adapters.rest.sse import open_event_stream
from adapters.rest.translate import (
    chat_completion_to_json,
    chunk_to_json,
    encode,
    model_list_to_json,
    model_to_json,
)
from adapters.rest.translate_completions import text_completion_to_json
from adapters.rest.upstream import (
    CHAT_SERVICE,
    REQUEST_ID_HEADER,
    ClientDisconnected,
    Upstream,
    request_id,
    unary_call,
)
from chatrpc.v1 import chat_pb2

_LIST_MODELS = chat_pb2.ListModelsRequest()
# What openapi.py builds from the proto and the adapter's tables (`make openapi`), served as committed.
_OPENAPI_DOCUMENT = resources.files(__package__).joinpath("openapi.json").read_bytes()


def _upstream(request: Request) -> Upstream:
    return request.app.state.upstream


def _json(request: Request, payload: dict, status: int = 200) -> Response:
    return Response(encode(payload), status, {REQUEST_ID_HEADER: request_id(request)}, "application/json")


async def create_chat_completion(request: Request) -> Response:
    body_reader: BodyReader = request.app.state.body_reader
    chat = await body_reader.chat_request(request)
    upstream = _upstream(request)
    if chat.stream:
        return await open_event_stream(request, upstream.stream_chat_completion, chat, chunk_to_json)
    completion = await unary_call(request, upstream.create_chat_completion, chat.wire, chat.affinity)
    return _json(request, chat_completion_to_json(completion))


async def create_completion(request: Request) -> Response:
    """The legacy text completion."""
    body_reader: BodyReader = request.app.state.body_reader
    text = await body_reader.completion_request(request)
    upstream = _upstream(request)
    if text.stream:
        return await open_event_stream(request, upstream.stream_completion, text, text_completion_to_json)
    completion = await unary_call(request, upstream.create_completion, text.wire, text.affinity)
    return _json(request, text_completion_to_json(completion))


async def list_models(request: Request) -> Response:
    models = await unary_call(request, _upstream(request).chat.ListModels, _LIST_MODELS)
    return _json(request, model_list_to_json(models))


async def retrieve_model(request: Request) -> Response:
    model_id = request.path_params["model"]
    models = await unary_call(request, _upstream(request).chat.ListModels, _LIST_MODELS)
    for model in models.data:
        if model.id == model_id:
            return _json(request, model_to_json(model))
    raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")


async def health(request: Request) -> Response:
    """The whole gRPC server's health, as it reports it."""
    return await _answer_health(request, "")


async def ready(request: Request) -> Response:
    """Ready to take chat requests: the chat service reports SERVING once its models are loaded, and
    NOT_SERVING from the moment it starts to drain. A readiness probe (Kubernetes) points here."""
    return await _answer_health(request, CHAT_SERVICE)


async def live(request: Request) -> Response:
    """The adapter's process answers; says nothing of the service (a liveness probe that followed
    the service would restart adapters for the service's faults)."""
    return _json(request, {"status": "ok"})


async def _answer_health(request: Request, service: str) -> Response:
    upstream = _upstream(request)
    if await upstream.is_serving(service):
        return _json(request, {"status": "ok"})
    raise APIError(
        503,
        f"The chat service at {upstream.target} is not serving.",
        type="server_error",
        code="service_unavailable",
        retry_after=RETRY_AFTER_SECONDS,
    )


async def openapi_document(request: Request) -> Response:
    return Response(_OPENAPI_DOCUMENT, 200, {REQUEST_ID_HEADER: request_id(request)}, "application/json")


ROUTES = [
    Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
    Route("/v1/completions", create_completion, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    # Model ids may contain slashes ("google/gemma-3-270m").
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/health/live", live, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


# ---------------------------------------------------------------------------
# Exception handlers: every failure in the OpenAI envelope
# ---------------------------------------------------------------------------


async def on_api_error(request: Request, error: APIError) -> Response:
    return error.to_response({REQUEST_ID_HEADER: request_id(request)})


async def on_http_exception(request: Request, error: HTTPException) -> Response:
    if error.status_code == 404:
        api_error = not_found_route(request.method, request.url.path)
    elif error.status_code == 405:
        api_error = method_not_allowed(request.method, request.url.path)
    else:
        api_error = APIError(error.status_code, str(error.detail))
    headers = dict(error.headers or {})
    headers[REQUEST_ID_HEADER] = request_id(request)
    return api_error.to_response(headers)


async def on_client_disconnected(request: Request, error: ClientDisconnected) -> Response:
    # Nobody reads this answer: the client has gone and the gRPC call is cancelled.
    return Response(status_code=499)


async def on_unexpected_error(request: Request, error: Exception) -> Response:
    # Starlette re-raises the exception after this answer is sent, and the server logs it.
    return internal_error().to_response({REQUEST_ID_HEADER: request_id(request)})


EXCEPTION_HANDLERS = {
    APIError: on_api_error,
    HTTPException: on_http_exception,
    ClientDisconnected: on_client_disconnected,
    Exception: on_unexpected_error,
}
