"""OpenAI's Responses API wire types (``POST /v1/responses``), stateless.

A Responses request is served on the chat path: its ``input`` (a string, or a
list of messages) and ``instructions`` become a chat conversation, and the
chat answer becomes a Response (``fma_requester/responses.py``). Nothing is
stored, so what needs state is refused by name: ``store: true``,
``previous_response_id``, ``conversation``, ``background: true``. What would
change the answer and is not implemented is refused too (tools, structured
output, reasoning effort, logprobs, images and files in the input,
``truncation: auto``); properties that change nothing we produce are accepted
(``metadata`` is echoed, ``user``, ``service_tier``, ``parallel_tool_calls``).
OpenAI's own default for ``store`` is true: a request that leaves it out gets
a Response that says ``"store": false``, which is what happened.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fma_common.errors import InvalidRequest, UnsupportedParameter

PATH_RESPONSES = "/v1/responses"


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    """One message of ``input`` (an ``EasyInputMessage`` or a ``message`` item)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            kind = part.get("type")
            if kind not in ("input_text", "output_text"):
                raise UnsupportedParameter(f"input content of type {kind!r} is not supported here (only text: "
                                           "input_text, output_text)", param="input")
            out.append(InputText.model_validate(part).text)
        return "".join(out)


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str = "text"


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt: Any = None

    @model_validator(mode="after")
    def _refuse_what_needs_state_or_is_not_built(self) -> ResponsesRequest:
        refusals = [
            ("store", self.store is True, "responses are not stored here (stateless): send store: false or leave "
                                          "it out"),
            ("previous_response_id", self.previous_response_id is not None,
             "responses are not stored here, so there is no previous response to continue; send the whole "
             "conversation in input"),
            ("conversation", self.conversation is not None,
             "conversations are not stored here; send the whole conversation in input"),
            ("background", self.background is True, "background responses are not supported"),
            ("tools", bool(self.tools), "tools are not supported; remove tools"),
            ("tool_choice", self.tool_choice not in (None, "none", "auto"), "tools are not supported"),
            ("text", self.text is not None and self.text.format is not None and self.text.format.type != "text",
             "only plain text output is supported (text.format.type: text)"),
            ("reasoning", bool(self.reasoning) and any(v is not None for v in (self.reasoning or {}).values()),
             "reasoning options are not supported by the models served here"),
            ("include", bool(self.include), "include is not supported"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            ("truncation", self.truncation == "auto",
             "truncation: auto is not supported; an input over the context is refused instead"),
            ("prompt", self.prompt is not None, "prompt templates are not supported"),
        ]
        for param, refused, why in refusals:
            if refused:
                raise UnsupportedParameter(why, param=param)
        return self

    def messages(self) -> list[dict[str, str]]:
        """The chat conversation this request stands for."""
        out: list[dict[str, str]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            if not self.input:
                raise InvalidRequest("input must not be empty", param="input")
            out.append({"role": "user", "content": self.input})
            return out
        if not self.input:
            raise InvalidRequest("input must not be an empty list", param="input")
        for item in self.input:
            kind = item.get("type", "message")
            if kind != "message":
                raise UnsupportedParameter(f"input items of type {kind!r} are not supported here (only messages)",
                                           param="input")
            try:
                msg = InputMessage.model_validate(item)
            except ValueError as exc:
                raise InvalidRequest(f"input: not a message: {str(exc).splitlines()[0]}", param="input") from None
            role = "system" if msg.role == "developer" else msg.role
            out.append({"role": role, "content": msg.text()})
        return out
