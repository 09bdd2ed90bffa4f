#!/usr/bin/env python3
"""Scriptable fake LLM upstream speaking the OpenAI and Anthropic HTTP APIs (loopback only).

In a test: ``async with FakeUpstream() as up:`` serves on ``up.url`` (a free 127.0.0.1 port);
``up.script(Behaviour(status=429), Behaviour(text="hi"))`` queues answers (one per API request,
FIFO, then the normal answer); ``up.attempts`` lists every request received, with when its
answer ended (``ended``) and whether the caller went away first (``client_gone``).
A request body may carry its own behaviour as ``"x_fake": {...}`` (used when no script is
queued: load tests mix faults into concurrent traffic without racing over the queue).
As a process: ``python tests/fakeupstream.py --port P [--delay-ms N]`` prints ``READY <port>``;
``POST /__script`` (JSON list of behaviours), ``GET /__attempts``, ``GET /__stats``, ``POST /__reset``.
Usage is deterministic: prompt tokens per ``prompt_tokens``; completion tokens = words produced
(or tool-call argument fragments). With ``tools`` (``tool_choice`` not "none", last message not a
tool result) the answer is a call of the first (or the chosen) tool, arguments from its schema.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import functools
import re
import signal
import socket
import struct
import time
import zlib
from typing import Any, Self, TypedDict

import orjson
from aiohttp import web
from multidict import CIMultiDict

JSON = dict[str, Any]
DEFAULT_TEXT = "Hello from the fake upstream. This answer is deterministic and short."
MODELS = ("mock-gpt", "gpt-4o-mini", "claude-mock", "mock-embed")
_dumps = orjson.dumps
_WORD = re.compile(r"\s*\S+")


@dataclasses.dataclass
class Behaviour:
    """How to answer one request. Defaults give the normal answer."""

    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: Any = None  # JSON returned verbatim (with status/headers) instead of the answer
    delay_ms: float | None = None  # before the headers; None = the server's --delay-ms
    text: str | None = None  # assistant text; None = the server's default text
    omit_usage: bool = False  # never send usage (like llama.cpp)
    sse_frames: list[str] | None = None  # raw frames sent verbatim as an SSE stream
    # the next three apply to streamed answers (stream: true, or sse_frames); a chunk = one SSE event
    cut_after_chunks: int | None = None  # close the connection after N stream chunks (no [DONE])
    stall_after_chunks: int | None = None  # stop after N stream chunks, keep connection open
    chunk_interval_ms: float | None = None  # gap between stream chunks; None = the server's default
    drop_connection: bool = False  # reset the connection without answering
    label: str | None = None  # free text, echoed in the attempt record

    @classmethod
    def from_json(cls, data: Any) -> Behaviour:
        if not isinstance(data, dict):
            raise TypeError("a behaviour must be a JSON object")
        unknown = set(data) - set(_FIELD_TYPES)
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        for key, value in data.items():
            ok = _FIELD_TYPES[key]
            items = list(value.values()) if key == "headers" else value if key == "sse_frames" else []
            if value is not None and not isinstance(value, ok) or isinstance(value, bool) and bool not in ok \
                    or not all(isinstance(x, str) for x in items):
                raise TypeError(f"behaviour field {key!r} has the wrong type")
        return cls(**data)

    def to_json(self) -> JSON:
        return dataclasses.asdict(self)


_NUM = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "status": (int,), "headers": (dict,), "body": (dict, list, str, int, float, bool),
    "delay_ms": _NUM, "text": (str,), "omit_usage": (bool,), "sse_frames": (list,),
    "cut_after_chunks": (int,), "stall_after_chunks": (int,), "chunk_interval_ms": _NUM,
    "drop_connection": (bool,), "label": (str,)}


class Attempt(TypedDict):
    method: str
    path: str
    model: str | None
    body: Any
    headers: dict[str, str]  # every request header, names lower-cased
    behaviour: JSON | None  # the scripted Behaviour that answered, None = default answer
    time: float
    ended: float | None  # when the answer ended (written, cut or abandoned); None while in progress
    client_gone: bool  # the caller closed the connection before the answer was complete


# ---------------------------------------------------------------- token counting

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(p.get("text", p.get("content"))) for p in content if isinstance(p, dict))
    return ""


def prompt_tokens(body: JSON) -> int:
    """Deterministic prompt size: per message (and Anthropic system) len(text) // 4 + 1."""
    n = len(_text_of(body["system"])) // 4 + 1 if body.get("system") else 0
    msgs = body.get("messages")
    for m in msgs if isinstance(msgs, list) else []:
        if isinstance(m, dict):
            n += len(_text_of(m.get("content"))) // 4 + 1
    return n


def input_tokens(inp: Any) -> int:
    """Embedding input size: strings len // 4 + 1 each, token arrays their length."""
    if isinstance(inp, str):
        return len(inp) // 4 + 1
    if isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
        return len(inp)
    return sum(input_tokens(x) for x in inp) if isinstance(inp, list) else 0


# ---------------------------------------------------------------- answer planning

@dataclasses.dataclass(slots=True)
class Plan:
    model: str
    pieces: list[str]  # text split into stream chunks ("".join == the text)
    tool: tuple[str, str, list[str]] | None  # (call id, name, argument fragments)
    finish: str  # stop | length | tool
    prompt: int
    completion: int


def _sample(schema: Any) -> Any:
    t = schema.get("type") if isinstance(schema, dict) else None
    t = t[0] if isinstance(t, list) and t else t
    if t == "string":
        return schema["enum"][0] if schema.get("enum") else "sample"
    return {"integer": 1, "number": 1.5, "boolean": True, "array": [], "null": None}.get(str(t), {})


def _pick_tool(body: JSON) -> tuple[str, str] | None:
    tools, choice, msgs = body.get("tools"), body.get("tool_choice"), body.get("messages")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    last = msgs[-1] if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else {}
    content = last.get("content")
    if last.get("role") == "tool" or isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
        return None  # answering a tool result: reply with text like a real model
    wanted = choice.get("name") or (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    fns = [t.get("function", t) for t in tools if isinstance(t, dict)]
    fn = next((f for f in fns if f.get("name") == wanted), fns[0] if fns else {})
    schema = fn.get("parameters") or fn.get("input_schema") or {}
    props = schema.get("properties") if isinstance(schema, dict) else None
    args = {k: _sample(v) for k, v in props.items()} if isinstance(props, dict) else {}
    return str(fn.get("name", "tool")), _dumps(args).decode()


def make_plan(body: JSON, text: str, seq: int) -> Plan:
    model = str(body.get("model", "mock-gpt"))
    tool = _pick_tool(body)
    if tool is not None:
        args = tool[1]
        frags = [args[i:i + 8] for i in range(0, len(args), 8)]
        return Plan(model, [], (f"call_{seq:08x}", tool[0], frags), "tool", prompt_tokens(body), len(frags))
    pieces = _WORD.findall(text)
    finish, cap = "stop", body.get("max_tokens", body.get("max_completion_tokens"))
    if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap < len(pieces):
        pieces, finish = pieces[:cap], "length"
    return Plan(model, pieces, None, finish, prompt_tokens(body), len(pieces))


# ---------------------------------------------------------------- wire formats

def _oa_usage(p: Plan) -> JSON:
    return {"prompt_tokens": p.prompt, "completion_tokens": p.completion, "total_tokens": p.prompt + p.completion}


def openai_json(p: Plan, seq: int, usage: bool) -> bytes:
    msg: JSON = {"role": "assistant", "content": "".join(p.pieces), "refusal": None}
    if p.tool:
        cid, name, frags = p.tool
        msg["content"] = None
        msg["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": "".join(frags)}}]
    out: JSON = {"id": f"chatcmpl-{seq:012x}", "object": "chat.completion", "created": int(time.time()),
                 "model": p.model, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                                "finish_reason": "tool_calls" if p.tool else p.finish}],
                 "system_fingerprint": "fp_fake"}
    if usage:
        out["usage"] = _oa_usage(p)
    return _dumps(out)


def openai_frames(p: Plan, seq: int, include_usage: bool) -> list[bytes]:
    head = (b'data: {"id":"chatcmpl-%012x","object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"system_fingerprint":"fp_fake","choices":[' % (seq, int(time.time()), _dumps(p.model)))
    tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def chunk(delta: bytes, finish: bytes = b"null") -> bytes:
        return head + b'{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + finish + b"}" + tail

    if p.tool:
        cid, name, frags = p.tool
        first = {"index": 0, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
        frames = [chunk(_dumps({"role": "assistant", "content": None, "tool_calls": [first]}))]
        frames += [chunk(_dumps({"tool_calls": [{"index": 0, "function": {"arguments": f}}]})) for f in frags]
    else:
        frames = [chunk(b'{"role":"assistant","content":"","refusal":null}')]
        frames += [chunk(b'{"content":' + _dumps(s) + b"}") for s in p.pieces]
    frames.append(chunk(b"{}", b'"tool_calls"' if p.tool else b'"%s"' % p.finish.encode()))
    if include_usage:
        frames.append(head + b'],"usage":' + _dumps(_oa_usage(p)) + b"}\n\n")
    frames.append(b"data: [DONE]\n\n")
    return frames


def _stop_reason(p: Plan) -> str:
    return {"tool": "tool_use", "length": "max_tokens"}.get(p.finish, "end_turn")


def anthropic_json(p: Plan, seq: int, usage: bool) -> bytes:
    blocks: list[JSON] = [{"type": "text", "text": "".join(p.pieces)}] if not p.tool else [
        {"type": "tool_use", "id": "toolu_" + p.tool[0][5:], "name": p.tool[1],
         "input": orjson.loads("".join(p.tool[2]))}]
    out: JSON = {"id": f"msg_{seq:012x}", "type": "message", "role": "assistant", "model": p.model,
                 "content": blocks, "stop_reason": _stop_reason(p), "stop_sequence": None}
    if usage:
        out["usage"] = {"input_tokens": p.prompt, "output_tokens": p.completion}
    return _dumps(out)


def _event(name: str, data: JSON) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def anthropic_frames(p: Plan, seq: int, usage: bool) -> list[bytes]:
    msg: JSON = {"id": f"msg_{seq:012x}", "type": "message", "role": "assistant", "model": p.model, "content": [],
                 "stop_reason": None, "stop_sequence": None}
    if usage:
        msg["usage"] = {"input_tokens": p.prompt, "output_tokens": 1}
    if p.tool:
        block: JSON = {"type": "tool_use", "id": "toolu_" + p.tool[0][5:], "name": p.tool[1], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": f} for f in p.tool[2]]
    else:
        block, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": s} for s in p.pieces]
    end: JSON = {"type": "message_delta", "delta": {"stop_reason": _stop_reason(p), "stop_sequence": None}}
    if usage:
        end["usage"] = {"output_tokens": p.completion}
    return [_event("message_start", {"type": "message_start", "message": msg}),
            _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
            _event("ping", {"type": "ping"}),
            *[_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas],
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", end), _event("message_stop", {"type": "message_stop"})]


def embeddings_json(body: JSON, dim: int, usage: bool) -> bytes:
    inp = body.get("input", "")
    items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
    dim = body["dimensions"] if isinstance(body.get("dimensions"), int) else dim
    data = []
    for i, item in enumerate(items):
        seed = zlib.crc32(_dumps(item))
        vec = [((seed >> (j % 20)) + 97 * j) % 2048 / 1024.0 - 1.0 for j in range(dim)]  # exact in float32
        emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() \
            if body.get("encoding_format") == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    out: JSON = {"object": "list", "data": data, "model": body.get("model", "mock-embed")}
    if usage:
        n = input_tokens(inp)
        out["usage"] = {"prompt_tokens": n, "total_tokens": n}
    return _dumps(out)


_ERR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def error_json(status: int, anthropic: bool, message: str = "") -> bytes:
    typ = _ERR_TYPES.get(status, "api_error")
    message = message or f"fake upstream error {status}"
    if anthropic:
        return _dumps({"type": "error", "error": {"type": typ, "message": message}})
    return _dumps({"error": {"message": message, "type": typ, "param": None, "code": typ}})


_MODELS_OA = _dumps({"object": "list", "data": [
    {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in MODELS]})
_MODELS_AN = _dumps({"data": [{"type": "model", "id": m, "display_name": m, "created_at": "2024-01-01T00:00:00Z"}
                              for m in MODELS], "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]})
_JSON_CT = "application/json"
_SSE_CT = "text/event-stream; charset=utf-8"


# ---------------------------------------------------------------- server

class FakeUpstream:
    """The fake upstream. ``async with FakeUpstream() as up`` serves on ``up.url`` until exit."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, delay_ms: float = 0.0,
                 chunk_interval_ms: float = 0.0, embed_dim: int = 8, text: str = DEFAULT_TEXT,
                 record_limit: int | None = None) -> None:
        self.host, self.port = host, port
        self.delay_ms, self.chunk_interval_ms, self.embed_dim, self.text = delay_ms, chunk_interval_ms, embed_dim, text
        self.stats: collections.Counter[str] = collections.Counter()
        self._queue: collections.deque[Behaviour] = collections.deque()
        self._attempts: collections.deque[Attempt] = collections.deque(maxlen=record_limit)
        self._record = record_limit != 0
        self._seq = 0
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=64 << 20)
        kinds = {"/v1/chat/completions": "chat", "/v1/messages": "messages", "/v1/embeddings": "embeddings",
                 "/v1/messages/count_tokens": "count_tokens"}
        for path, kind in kinds.items():
            self.app.router.add_post(path, functools.partial(self._serve, kind=kind))
        self.app.router.add_get("/v1/models", functools.partial(self._serve, kind="models"))
        for path in ("/__script", "/__reset", "/__attempts", "/__stats"):
            self.app.router.add_route("POST" if path in ("/__script", "/__reset") else "GET", path, self._control)
        self.app.router.add_route("*", "/{tail:.*}", functools.partial(self._serve, kind="unknown"))

    # -- public API
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def attempts(self) -> list[Attempt]:
        return list(self._attempts)

    @property
    def pending(self) -> int:
        """Scripted behaviours not consumed yet."""
        return len(self._queue)

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each API request consumes the oldest one."""
        self._queue.extend(behaviours)

    def reset(self) -> None:
        self._queue.clear()
        self._attempts.clear()
        self.stats.clear()

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, backlog=1024).start()
        return self

    async def close(self) -> None:
        self._closing.set()  # releases stalled streams and pending delays
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- request handling
    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read() if request.body_exists else b""
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = None
        anthropic = kind in ("messages", "count_tokens")
        beh = self._queue.popleft() if self._queue and kind != "unknown" else None
        if beh is None and isinstance(body, dict) and isinstance(body.get("x_fake"), dict):
            beh = Behaviour.from_json(body["x_fake"])
        self._seq += 1
        self.stats["requests"] += 1
        attempt = Attempt(
            method=request.method, path=request.path, body=body if body is not None else raw.decode(errors="replace"),
            model=body.get("model") if isinstance(body, dict) else None, time=time.time(),
            headers={k.lower(): v for k, v in request.headers.items()},
            behaviour=beh.to_json() if beh is not None else None, ended=None, client_gone=False)
        if self._record:
            self._attempts.append(attempt)
        try:
            return await self._respond(request, kind, body, raw, beh, anthropic)
        except (asyncio.CancelledError, ConnectionResetError):
            attempt["client_gone"] = True
            self.stats["client_gone"] += 1
            raise
        finally:
            attempt["ended"] = time.time()

    async def _respond(self, request: web.Request, kind: str, body: Any, raw: bytes, beh: Behaviour | None,
                       anthropic: bool) -> web.StreamResponse:
        delay = beh.delay_ms if beh is not None and beh.delay_ms is not None else self.delay_ms
        if delay and not await self._pause(delay / 1000):
            return self._kill(request, rst=True)
        if kind == "unknown":
            return self._json(error_json(404, anthropic, f"no route {request.method} {request.path}"), 404, None)
        if beh is not None:
            if beh.drop_connection:
                return self._kill(request, rst=True)
            if beh.body is not None:
                return self._json(_dumps(beh.body), beh.status, beh.headers)
            if beh.sse_frames is not None:
                return await self._stream(request, [f.encode() for f in beh.sse_frames], beh)
            if beh.status >= 400:
                return self._json(error_json(beh.status, anthropic), beh.status, beh.headers)
        if not isinstance(body, dict):
            return self._json(error_json(400, anthropic, "request body is not a JSON object"), 400, None)
        return await self._answer(request, kind, body, beh)

    async def _answer(self, request: web.Request, kind: str, body: JSON, beh: Behaviour | None) -> web.StreamResponse:
        usage = beh is None or not beh.omit_usage
        status, headers = (beh.status, beh.headers) if beh is not None else (200, None)
        if kind == "models":
            return self._json(_MODELS_AN if "anthropic-version" in request.headers else _MODELS_OA, status, headers)
        if kind == "embeddings":
            return self._json(embeddings_json(body, self.embed_dim, usage), status, headers)
        if kind == "count_tokens":
            return self._json(_dumps({"input_tokens": prompt_tokens(body)}), status, headers)
        plan = make_plan(body, beh.text if beh is not None and beh.text is not None else self.text, self._seq)
        if kind == "messages":
            if body.get("stream") is True:
                return await self._stream(request, anthropic_frames(plan, self._seq, usage), beh)
            return self._json(anthropic_json(plan, self._seq, usage), status, headers)
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include = usage and isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream(request, openai_frames(plan, self._seq, include), beh)
        return self._json(openai_json(plan, self._seq, usage), status, headers)

    @staticmethod
    def _json(data: bytes, status: int, extra: dict[str, str] | None) -> web.Response:
        if not extra:
            return web.Response(body=data, status=status, content_type=_JSON_CT)
        headers = CIMultiDict({"Content-Type": _JSON_CT})
        headers.update(extra)
        return web.Response(body=data, status=status, headers=headers)

    async def _stream(self, request: web.Request, frames: list[bytes], beh: Behaviour | None) -> web.StreamResponse:
        headers = CIMultiDict({"Content-Type": _SSE_CT, "Cache-Control": "no-cache"})
        headers.update(beh.headers if beh is not None else {})
        resp = web.StreamResponse(status=beh.status if beh is not None else 200, headers=headers)
        await resp.prepare(request)
        cut = beh.cut_after_chunks if beh is not None else None
        stall = beh.stall_after_chunks if beh is not None else None
        gap = beh.chunk_interval_ms if beh is not None and beh.chunk_interval_ms is not None else self.chunk_interval_ms
        if cut is None and stall is None and not gap:
            await resp.write(b"".join(frames))  # fast path: one write
            await resp.write_eof()
            return resp
        for i in range(len(frames) + 1):
            if i == cut:
                return self._kill(request, rst=False, resp=resp)
            if i == stall:
                await self._closing.wait()
                return self._kill(request, rst=False, resp=resp)
            if i == len(frames):
                break
            if i and gap:
                await asyncio.sleep(gap / 1000)
            await resp.write(frames[i])
        await resp.write_eof()
        return resp

    async def _pause(self, seconds: float) -> bool:
        """Sleep; False when the server is shutting down meanwhile."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
            return False
        except TimeoutError:
            return True

    @staticmethod
    def _kill(request: web.Request, rst: bool, resp: web.StreamResponse | None = None) -> web.StreamResponse:
        """Close the connection abruptly (rst: TCP reset, nothing flushed); aiohttp then skips the answer."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if rst and sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.close()
        return resp if resp is not None else web.Response(status=204)

    async def _control(self, request: web.Request) -> web.Response:
        """/__script, /__attempts, /__reset, /__stats: not recorded, consume no behaviour."""
        out: Any = {"requests": self.stats["requests"], "pending": len(self._queue)}
        if request.path == "/__attempts":
            out = list(self._attempts)
        elif request.path == "/__reset":
            self.reset()
            out = {"reset": True}
        elif request.path == "/__script":
            try:
                items = orjson.loads(await request.read())
                if not isinstance(items, list):
                    raise TypeError("POST /__script takes a JSON list of behaviours")
                self.script(*[Behaviour.from_json(x) for x in items])
            except (ValueError, TypeError) as exc:
                return self._json(_dumps({"error": str(exc)}), 400, None)
            out = {"queued": len(self._queue)}
        return self._json(_dumps(out), 200, None)


# ---------------------------------------------------------------- command line

async def _serve_forever(args: argparse.Namespace) -> None:
    up = FakeUpstream(host=args.host, port=args.port, delay_ms=args.delay_ms, chunk_interval_ms=args.chunk_interval_ms,
                      embed_dim=args.embed_dim, record_limit=None if args.record_limit < 0 else args.record_limit)
    await up.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {up.port}", flush=True)
    await stop.wait()
    await up.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="scriptable fake OpenAI/Anthropic upstream")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port (printed as READY <port>)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="latency before every answer's headers")
    ap.add_argument("--chunk-interval-ms", type=float, default=0.0, help="gap between stream chunks")
    ap.add_argument("--embed-dim", type=int, default=8)
    ap.add_argument("--record-limit", type=int, default=-1,
                    help="keep only the last N attempts (0 = record none, for benchmarks; -1 = all)")
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_forever(args))
    else:
        uvloop.run(_serve_forever(args))


if __name__ == "__main__":
    main()
