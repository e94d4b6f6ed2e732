"""OpenAI's Responses API on the chat path: a Responses request in, a chat completion to the worker, a Response out.

The worker serves chat completions only; the requester translates (as a
gateway would), so every worker, local or on Knative, serves Responses with no
change, and cold starts, queues, deadlines and metrics are the chat path's.
The translation is stateless (``fma_common.wire_responses`` refuses what would
need state).

Streaming follows OpenAI's event sequence: ``response.created``,
``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per chat
chunk with text, then ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and
``response.completed`` (``incomplete`` when ``max_output_tokens`` cut it).
Each event is ``event: TYPE`` plus ``data: {...}`` with a ``sequence_number``.
A failure after the stream began ends it with an ``error`` event and a
``response.failed`` (the chat path's error event, translated). SSE comments
(the keepalives of a cold start) pass through untouched.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fma_common.wire_responses import ResponsesRequest


def chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completion request that serves ``req``."""
    body: dict[str, Any] = {"model": req.model, "messages": req.messages(), "stream": req.stream}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _new_ids() -> tuple[str, str]:
    return f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"


def response_object(req: ResponsesRequest, rid: str, created: int, status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, *, model: str | None = None,
                    incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": model or req.model, "output": output, "parallel_tool_calls": bool(req.parallel_tool_calls),
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
        "temperature": req.temperature, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": req.top_p, "truncation": "disabled", "metadata": req.metadata or {},
    }
    # OpenAI's schema has both as optional and never null (a string, an object): left out until known. The
    # official SDK reads a missing one as None, as it reads a null one.
    if usage is not None:
        answer["usage"] = usage
    if req.user is not None:
        answer["user"] = req.user
    return answer


def _usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    prompt, completion = int(chat_usage.get("prompt_tokens", 0)), int(chat_usage.get("completion_tokens", 0))
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _message(mid: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" \
        else []
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}


def from_chat(req: ResponsesRequest, chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (not streamed) as a Response."""
    rid, mid = _new_ids()
    choice = (chat.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    cut = choice.get("finish_reason") == "length"
    return response_object(req, rid, int(chat.get("created") or time.time()), "incomplete" if cut else "completed",
                           [_message(mid, text, "incomplete" if cut else "completed")], _usage(chat.get("usage")),
                           model=chat.get("model"), incomplete="max_output_tokens" if cut else None)


class ResponsesStream:
    """The chat stream's SSE, re-told as Responses events; closing it closes the chat stream (the worker stops)."""

    def __init__(self, req: ResponsesRequest, chat_stream: Any) -> None:
        self.req, self._chat = req, chat_stream
        self.rid, self.mid = _new_ids()
        self.created = int(time.time())
        self._seq = 0

    def close(self) -> None:
        close = getattr(self._chat, "close", None)
        if close is not None:
            close()

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    def _response(self, status: str, text: str | None, usage: dict[str, Any] | None = None,
                  incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        output = [] if text is None else [_message(self.mid, text, status if status != "failed" else "incomplete")]
        return response_object(self.req, self.rid, self.created, status, output, usage, incomplete=incomplete,
                               error=error)

    def __iter__(self) -> Iterator[bytes]:
        yield self._event("response.created", response=self._response("in_progress", None))
        yield self._event("response.in_progress", response=self._response("in_progress", None))
        text: list[str] = []
        started = False
        finish: str | None = None
        usage: dict[str, Any] | None = None
        buffer = b""
        for chunk in self._chat:
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                if not raw.strip():
                    continue
                if raw.startswith(b":"):
                    yield raw + b"\n\n"  # a keepalive comment of a cold start
                    continue
                data = b"\n".join(line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:"))
                if data == b"[DONE]":
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if "error" in event:
                    err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                    yield self._event("error", code=err.get("code"), message=err.get("message") or "generation "
                                      "failed", param=err.get("param"))
                    yield self._event("response.failed", response=self._response(
                        "failed", "".join(text) if started else None,
                        error={"code": err.get("code") or "server_error", "message": err.get("message") or ""}))
                    return
                if event.get("usage"):
                    usage = _usage(event["usage"])
                for choice in event.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if not started and (delta is not None or choice.get("finish_reason")):
                        started = True
                        yield self._event("response.output_item.added", output_index=0,
                                          item=_message(self.mid, "", "in_progress"))
                        yield self._event("response.content_part.added", item_id=self.mid, output_index=0,
                                          content_index=0, part={"type": "output_text", "text": "",
                                                                 "annotations": [], "logprobs": []})
                    if delta:
                        text.append(delta)
                        yield self._event("response.output_text.delta", item_id=self.mid, output_index=0,
                                          content_index=0, delta=delta, logprobs=[])
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        if not started:  # the chat stream ended without a choice: still a well-formed (empty) answer
            yield self._event("response.output_item.added", output_index=0,
                              item=_message(self.mid, "", "in_progress"))
            yield self._event("response.content_part.added", item_id=self.mid, output_index=0, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        whole = "".join(text)
        cut = finish == "length"
        status = "incomplete" if cut else "completed"
        yield self._event("response.output_text.done", item_id=self.mid, output_index=0, content_index=0,
                          text=whole, logprobs=[])
        yield self._event("response.content_part.done", item_id=self.mid, output_index=0, content_index=0,
                          part={"type": "output_text", "text": whole, "annotations": [], "logprobs": []})
        yield self._event("response.output_item.done", output_index=0, item=_message(self.mid, whole, status))
        yield self._event("response.incomplete" if cut else "response.completed",
                          response=self._response(status, whole, usage,
                                                  incomplete="max_output_tokens" if cut else None))
