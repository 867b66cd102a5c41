"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app around one loaded model.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models,
GET /health, and GET / (the chat page). Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}} with a matching HTTP status.
"""
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import ContextOverflowError, InvalidRequestError, MissingDependencyError
from . import generation
from .generation import Started
from ..scheduler import SchedulerFullError
from .runner import ModelRunner, QueueFullError
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .sse import DONE, EventStreamResponse, encode, listen_for_disconnect


class APIError(Exception):
    """An error to send in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(exc: Exception) -> APIError:
    """The APIError a failure of the model or the request becomes."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, MissingDependencyError):   # the request asks for a feature this install lacks
        return APIError(400, str(exc), code="unsupported_feature")
    if isinstance(exc, (QueueFullError, SchedulerFullError)):
        return APIError(503, str(exc), type="server_error", code="server_overloaded")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def chat_page() -> str:
    return resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")


# Requests allowed to run or wait at once by default; more get 503.
MAX_QUEUE = 64
# Largest request body accepted; a chat request of a full 32k-token context is far smaller.
MAX_BODY_BYTES = 8 << 20


class BodyLimit:
    """ASGI middleware refusing bodies over `limit` bytes (413) before they are read into memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:   # chunked bodies carry no length: count as they arrive
                raise _BodyTooLarge()
            return message
        try:
            await self.app(scope, counted_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        error = APIError(413, f"the request body is larger than {self.limit:,} bytes", code="request_too_large")
        await error.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(llm, *, model_name=None, api_key=None, max_queue=MAX_QUEUE, cache_ram_bytes=0, cors_origins=(),
               max_body_bytes=MAX_BODY_BYTES, health_info=None) -> FastAPI:
    """A FastAPI app serving `llm` (a loaded zephyr.LLM). The app does not close the model.

    model_name: the id /v1/models reports (default: the file name); requests may name any model.
    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
    max_queue: requests allowed to run or wait at once; more get 503. As many as the model has KV
    cache sequences (its `sequences`, `zephyr serve --parallel`) run together; the rest wait.
    cache_ram_bytes: RAM for conversation prefixes the sequences lose, restored when they return.
    health_info: an async function returning more fields for /health (Ray Serve: the replicas).
    """
    name = model_name or Path(llm.model_path).name
    # Names the process that answers (system_fingerprint), so replicas behind one endpoint can be told apart.
    fingerprint = f"{socket.gethostname()}:{os.getpid()}"
    runner = ModelRunner(llm, max_queue, cache_ram_bytes)
    page = chat_page()

    @asynccontextmanager
    async def lifespan(app):
        yield
        runner.shutdown()

    app = FastAPI(title="zephyr", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        message = exc.detail
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return api_error(exc).response()

    def check_key(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(request, "chat", body)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await respond(request, "completion", body)

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest):
        try:
            inputs = await runner.call(generation.embedding_inputs, body)
            return generation.embedding_response(body, inputs, await runner.embed(inputs), name)
        except Exception as exc:
            raise api_error(exc) from None

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"this server runs the model {name!r}, not {model_id!r}", param="model",
                           code="model_not_found")
        return model_card()

    app.include_router(v1)

    @app.get("/health")
    async def health():
        report = {"status": "ok", "model": name, "requests_in_progress": runner.pending,
                  "system_fingerprint": fingerprint}
        if health_info is not None:
            report.update(await health_info())
        return report

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    started = int(time.time())

    def model_card():
        return {"id": name, "object": "model", "created": started, "owned_by": "zephyr"}

    async def respond(request: Request, kind: str, body):
        stream = runner.stream(generation.prepare, kind, body, name, fingerprint)
        try:
            first = await until_disconnect(request, stream.cancel, stream.next)
        except Exception as exc:
            raise api_error(exc) from None
        if first is None:   # the client left before generation began
            return Response(status_code=499)
        assert isinstance(first, Started)
        if body.stream:
            return EventStreamResponse(sse_events(first.completion, stream), on_disconnect=stream.cancel)
        return await until_disconnect(request, stream.cancel, lambda: collect(first.completion, stream))

    async def collect(completion, stream):
        async for event in stream:
            completion.add(event.step, event.choice)
        if completion.finish_reason is None:
            return Response(status_code=499)
        return completion.response()

    async def sse_events(completion, stream):
        for chunk in completion.opening():
            yield encode(chunk)
        try:
            async for event in stream:
                for chunk in completion.chunks(event.step, event.choice):
                    yield encode(chunk)
        except Exception as exc:   # the status line has gone out: report the error in the stream
            yield encode(api_error(exc).body())
            return
        yield DONE

    return app


async def until_disconnect(request: Request, cancel, work):
    """Await work() while listening for the client to leave; if it does, call cancel()."""
    result = error = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listen_for_disconnect, request.receive, cancel)
        try:
            result = await work()
        except Exception as exc:   # raised below, outside the task group, so not as an ExceptionGroup
            error = exc
        tasks.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    param = ".".join(where) or None
    return APIError(400, f"{param}: {message}" if param else message, param=param)
