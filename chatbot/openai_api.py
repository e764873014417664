"""The OpenAI-compatible API under /v1: other clients chat with the personas.

The `openai` library, SillyTavern, Open WebUI or a script talk to the app as
to OpenAI: a "model" is a persona id.

    GET  /v1/models             the personas, as model objects
    GET  /v1/models/{id}        one of them
    POST /v1/chat/completions   a reply as the persona (streamed as server-sent events with "stream": true)
    POST /v1/feedback           a thumbs up or down on a stored reply, by its message id

A reply goes through ``ChatService`` exactly as in the browser's chat: the
persona's system prompt, examples, greeting and served adapter, and the
exchange stored with its model version, settings and prompt. The client's
system messages are ignored (the persona is the system prompt).

Conversations: OpenAI clients send the whole history each time. Without the
extension field ``conversation_id`` a request starts a new conversation, whose
history is the request's earlier user and assistant messages (an opening
assistant message takes the greeting's place), and the last message, from
the user, is sent. With ``conversation_id`` (returned in every response) the
request's last message continues that stored conversation and the rest of its
messages are not read. Every response also carries ``message_id``, the stored
reply's id, which ``/v1/feedback`` rates. ``id`` is ``chatcmpl-<message_id>``;
a streamed reply is stored when it ends, so only its last chunks carry that
id and ``message_id`` (the earlier ones: ``chatcmpl-pending-<user message id>``).

Who is asking: once any account exists, every request needs an account's key
(``Authorization: Bearer <key>``, from ``persona-studio users api-key NAME``);
with no accounts (or ``--auth off``) everyone is the local user, as in the
browser. A key reaches only its own account's conversations and messages.

Every bad request is a 4xx with OpenAI's error shape and a one-line message.
Generation runs in worker threads, never on the event loop; a streaming client
that disconnects stops its reply, which is stored as stopped, as the browser's
Stop button does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from .chat import MAX_COMMENT_CHARS, MAX_REASON_CHARS, ChatError, ChatService, ChatSession, params_for
from .default_model import ModelLoadError
from .engine import EngineUnavailable, GenerationParams, Reply
from .personas import PersonaError
from .prompting import PromptTooLong
from .store import StoreError
from .store.accounts import AccountStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413)
DRAIN_BODY_BYTES = 16 << 20  # read (and drop) up to this much of a refused body, so the client sees the 413
GENERATION_THREADS = 32  # replies generated at once through the API; more wait for a thread
DISCONNECT_POLL_S = 1.0  # how often a reply being waited for checks that its client is still there
OWNER = "persona-studio"
SYSTEM_ROLES = ("system", "developer")  # ignored: the persona gives the system prompt
FINISH_REASONS = {"eos": "stop", "length": "length", "stopped": "stop"}


# -- errors ----------------------------------------------------------------------


class ApiError(Exception):
    """A request that cannot be answered; becomes OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def as_api_error(exc: BaseException) -> ApiError:
    """The API's answer to an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), "context_length_exceeded")
    if isinstance(exc, ChatError):
        # ChatService turns an engine that is down, or an adapter that will not load, into a ChatError.
        if isinstance(exc.__context__, (EngineUnavailable, ModelLoadError)):
            return ApiError(503, str(exc), "engine_unavailable", "server_error")
        return ApiError(400, str(exc))
    if isinstance(exc, PersonaError):
        return ApiError(404, str(exc), "model_not_found", param="model")
    if isinstance(exc, StoreError):
        return ApiError(503, str(exc), "database_unavailable", "server_error")
    log.error("/v1: unexpected error", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                    "internal_error", "server_error")


class _JsonErrors(APIRoute):
    """Routes whose every failure is OpenAI's error JSON, never a traceback page."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except HTTPException:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure answers in the API's shape
                return as_api_error(exc).response()

        return route


# -- request bodies ----------------------------------------------------------------


StrictInt = Annotated[int, Field(strict=True)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None  # text parts ({"type": "text", "text": ...}) are joined by lines

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content is supported, not a {kind!r} part")
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Annotated[bool, Field(strict=True)] = False


class ChatCompletionRequest(BaseModel):
    """The fields read; others (stop, presence_penalty, tools, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    messages: list[ChatMessage]
    max_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    temperature: Annotated[float | None, Field(strict=True, ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(strict=True, gt=0.0, le=1.0)] = None
    seed: Annotated[int | None, Field(strict=True, ge=0, lt=2**63)] = None
    n: Annotated[int | None, Field(strict=True)] = None
    stream: Annotated[bool | None, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    conversation_id: Annotated[int | None, Field(strict=True, ge=1)] = None  # extension: continue it

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must hold at least one message")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only 1 choice per request is supported")
        return value


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_id: Annotated[int, Field(strict=True, ge=1)]
    rating: int | str  # 1 or "up", -1 or "down"
    reason: Annotated[str | None, Field(max_length=MAX_REASON_CHARS)] = None  # stored like the browser's reason tags
    comment: Annotated[str | None, Field(max_length=MAX_COMMENT_CHARS)] = None

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> int:
        if isinstance(value, str) and value.strip().lower() in ("up", "down"):
            return 1 if value.strip().lower() == "up" else -1
        if isinstance(value, int) and not isinstance(value, bool) and value in (1, -1):
            return value
        raise ValueError(f'must be 1 or "up", -1 or "down", not {value!r}')


def _problem(exc: ValidationError) -> str:
    """A validation error as one line: where, and what is wrong."""
    error = exc.errors()[0]
    where = ""
    for part in error["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f"{'.' if where else ''}{part}"
    message = error["msg"].removeprefix("Value error, ")
    more = exc.error_count() - 1
    return f"{where or 'body'}: {message}" + (f" (and {more} more problem(s))" if more else "")


async def read_body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body, validated against ``model``; ApiError (400, 413) saying what is wrong."""
    too_large = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB",
                         "request_too_large")
    declared = request.headers.get("content-length", "")
    body = bytearray()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > DRAIN_BODY_BYTES:
            raise too_large
        if received <= MAX_BODY_BYTES and not (declared.isdigit() and int(declared) > MAX_BODY_BYTES):
            body += chunk
    if received > MAX_BODY_BYTES:
        raise too_large
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        raise ApiError(400, _problem(exc), param=str(loc[0]) if loc else None) from None


# -- who is asking -------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    id: int
    name: str  # also what {{user}} in a persona becomes


# -- the router ------------------------------------------------------------------------


@dataclass
class _Plan:
    """A chat completion ready to run: the session, what to store first, what to send."""

    session: ChatSession
    history: list[dict]
    text: str
    params: GenerationParams


def build_router(service: ChatService, accounts: AccountStore, local_user: str,
                 auth: str = "auto") -> APIRouter:
    """The /v1 routes (include with ``prefix="/v1"``) over the app's shared services.

    ``auth`` as `serve --auth`: "auto" asks for an API key once any account
    exists (checked per request), "on" always, "off" never (everyone is
    ``local_user``).
    """
    if auth not in ("auto", "on", "off"):
        raise ValueError(f"auth must be auto, on or off, not {auth!r}")
    router = APIRouter(route_class=_JsonErrors)
    threads = anyio.CapacityLimiter(GENERATION_THREADS)
    finishing: set[asyncio.Future] = set()  # replies still running whose client left: kept until stored

    @functools.cache
    def local_user_id() -> int:  # looked up (created if new) once, not on every request
        return service.user_id(local_user)

    def caller(authorization: str | None) -> Caller:
        if auth == "off" or (auth == "auto" and not accounts.has_accounts()):
            return Caller(local_user_id(), local_user)
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "an API key is required: send `Authorization: Bearer <key>` "
                                "(`persona-studio users api-key NAME` makes one)", "invalid_api_key")
        account = accounts.user_for_api_key(key.strip())
        if account is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        return Caller(account.id, account.name)

    async def who(request: Request) -> Caller:
        return await run_in_threadpool(caller, request.headers.get("authorization"))

    def persona_ids() -> list[str]:
        service.personas.refresh()
        return service.personas.ids()

    def model_object(persona_id: str) -> dict:
        return {"id": persona_id, "object": "model", "created": 0, "owned_by": OWNER}

    @router.get("/models")
    async def list_models(request: Request):
        await who(request)
        return {"object": "list", "data": [model_object(p) for p in await run_in_threadpool(persona_ids)]}

    @router.get("/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        await who(request)
        if model_id not in await run_in_threadpool(persona_ids):
            raise ApiError(404, f"unknown persona {model_id!r}", "model_not_found", param="model")
        return model_object(model_id)

    def plan(user: Caller, body: ChatCompletionRequest) -> _Plan:
        """Check the request against the store and the personas; nothing is stored yet."""
        numbered = [(i, m) for i, m in enumerate(body.messages) if m.role not in SYSTEM_ROLES]
        if not numbered:
            raise ApiError(400, "messages: there is no user message (system messages are ignored: "
                                "the persona gives the system prompt)", param="messages")
        for i, m in numbered:
            if not (m.content or "").strip():
                raise ApiError(400, f"messages[{i}]: the {m.role} message is empty", param="messages")
        last_index, last = numbered[-1]
        if last.role != "user":
            raise ApiError(400, f"messages[{last_index}]: the last message must be from the user, "
                                f"not the {last.role}", param="messages")
        service.personas.refresh()
        service.personas.get(body.model)  # PersonaError: 404 naming it
        if body.conversation_id is None:
            session = service.new_session(user.id, body.model, user.name)
            history = [{"role": m.role, "content": m.content} for _, m in numbered[:-1]]
        else:
            try:
                session = service.resume(user.id, body.conversation_id, user.name)
            except ChatError as exc:  # someone else's looks like a missing one
                raise ApiError(404, str(exc), "conversation_not_found", param="conversation_id") from None
            if session.persona.id != body.model:
                raise ApiError(400, f"conversation {body.conversation_id} is with persona "
                                    f"{session.persona.id!r}, not {body.model!r}", param="model")
            history = []
        tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = params_for(session.persona, max_new_tokens=tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=body.seed)
        return _Plan(session, history, last.content, params)

    def start(p: _Plan, stop: threading.Event) -> asyncio.Queue:
        """Generate in a worker thread; its events arrive on the queue.

        ("start", conversation id, user message id), then ("reply", Reply)
        as it grows, then ("done", the stored reply's id) or ("error", exc).
        The thread runs to the end even if nobody reads any more, so the reply
        (stopped, when ``stop`` is set) is stored whatever the client does.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        def generate() -> None:
            try:
                started = False
                for reply in service.send(p.session, p.text, p.params, stop, history=p.history):
                    if not started:
                        started = True
                        put("start", p.session.conversation_id, p.session.turns[-1].message_id)
                    put("reply", reply)
                put("done", p.session.turns[-1].message_id)
            except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers with it
                put("error", exc)

        task = asyncio.ensure_future(anyio.to_thread.run_sync(generate, limiter=threads))
        finishing.add(task)
        task.add_done_callback(finishing.discard)
        return events

    async def next_event(events: asyncio.Queue, request: Request, stop: threading.Event) -> tuple:
        """The next event; meanwhile a client that hung up stops the reply."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if not stop.is_set() and await request.is_disconnected():
                    stop.set()

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        user = await who(request)
        body: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        p = await run_in_threadpool(plan, user, body)
        created = int(time.time())
        stop = threading.Event()
        events = start(p, stop)
        first = await next_event(events, request, stop)
        if first[0] == "error":
            raise as_api_error(first[1])
        kind, conversation_id, user_message_id = first
        assert kind == "start", kind
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(events, stop, body.model, created, conversation_id, user_message_id, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final: Reply | None = None
        while True:
            event = await next_event(events, request, stop)
            if event[0] == "reply":
                final = event[1]
            elif event[0] == "error":
                raise as_api_error(event[1])
            else:
                message_id = event[1]
                break
        assert final is not None
        return {
            "id": f"chatcmpl-{message_id}", "object": "chat.completion", "created": created,
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                         "logprobs": None, "finish_reason": FINISH_REASONS.get(final.finish_reason, "stop")}],
            "usage": _usage(final), "conversation_id": conversation_id, "message_id": message_id,
        }

    async def _stream(events: asyncio.Queue, stop: threading.Event, model: str, created: int,
                      conversation_id: int, user_message_id: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, message_id: int | None = None) -> str:
            data = {"id": f"chatcmpl-{message_id}" if message_id else f"chatcmpl-pending-{user_message_id}",
                    "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "conversation_id": conversation_id, "message_id": message_id}
            if include_usage:
                data["usage"] = None
            return _sse(data)

        sent = ""
        final: Reply | None = None
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                # Starlette cancels this generator when the client disconnects: `finally` stops the reply.
                kind, *value = await events.get()
                if kind == "reply":
                    final = value[0]
                    if final.text.startswith(sent) and len(final.text) > len(sent):
                        yield chunk({"content": final.text[len(sent):]})
                        sent = final.text
                elif kind == "error":
                    yield _sse(as_api_error(value[0]).body())
                    break
                else:
                    message_id = value[0]
                    assert final is not None
                    yield chunk({}, FINISH_REASONS.get(final.finish_reason, "stop"), message_id)
                    if include_usage:
                        yield _sse({"id": f"chatcmpl-{message_id}", "object": "chat.completion.chunk",
                                    "created": created, "model": model, "choices": [], "usage": _usage(final),
                                    "conversation_id": conversation_id, "message_id": message_id})
                    break
            yield "data: [DONE]\n\n"
        finally:
            stop.set()  # a no-op once the reply is done

    @router.post("/feedback")
    async def feedback(request: Request):
        user = await who(request)
        body: FeedbackRequest = await read_body(request, FeedbackRequest)
        given = body.model_fields_set
        options = {name: getattr(body, name) for name in ("reason", "comment") if name in given}

        def vote() -> None:
            try:
                service.vote_message(user.id, body.message_id, body.rating, **options)
            except ChatError as exc:
                raise ApiError(404, str(exc), "message_not_found", param="message_id") from None

        await run_in_threadpool(vote)
        return {"object": "feedback", "message_id": body.message_id, "rating": body.rating, **options}

    # Last: any other path under /v1 (the Gradio app at the root would answer it with a page).
    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown_route(path: str, request: Request):
        raise ApiError(404, f"no route {request.method} /v1/{path}: this server offers GET /v1/models, "
                            "POST /v1/chat/completions and POST /v1/feedback", "unknown_route")

    return router


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
