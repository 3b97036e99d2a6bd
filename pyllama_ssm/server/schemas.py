"""Request bodies of the OpenAI-compatible routes, validated before any model work.

Field names, defaults and bounds follow llama_cpp.server's types; unlike it,
unknown fields are refused (a misspelt `max_token` must not pass silently),
and values llama_cpp.server ignores or asserts on (n > 1, several prompts,
an empty prompt) are refused with the field named.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class _Sampling(_Body):
    """The sampling fields shared by completions and chat completions."""

    model: Optional[str] = Field(default=None, description="The alias of a configured model (default: the first).")
    min_tokens: int = Field(default=0, ge=0, description="Generate at least this many tokens (EOS suppressed).")
    temperature: float = Field(default=0.8, ge=0.0, description="Randomness; 0 picks the most likely token.")
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = Field(default=None, description="Strings at which to stop generating.")
    stream: bool = Field(default=False, description="Stream the result as server-sent events.")
    presence_penalty: Optional[float] = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(default=None, description="Token id (or text) -> bias.")
    seed: Optional[int] = Field(default=None)
    n: Optional[int] = Field(default=1)
    user: Optional[str] = Field(default=None)
    # llama.cpp specific
    top_k: int = Field(default=40, ge=0)
    repeat_penalty: float = Field(default=1.1, ge=0.0)
    logit_bias_type: Optional[Literal["input_ids", "tokens"]] = Field(default=None)
    mirostat_mode: int = Field(default=0, ge=0, le=2)
    mirostat_tau: float = Field(default=5.0, ge=0.0, le=10.0)
    mirostat_eta: float = Field(default=0.1, ge=0.001, le=1.0)
    grammar: Optional[str] = Field(default=None, description="A GBNF grammar the output must follow.")

    @field_validator("n", "best_of", check_fields=False)
    @classmethod
    def _only_one(cls, n: Optional[int]) -> Optional[int]:
        if n is not None and n != 1:
            raise ValueError(f"{n} given: only 1 is supported; send one request per completion")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        if isinstance(stop, list) and len(stop) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stop)}")
        return stop


TokenIds = list[int]


class CreateCompletionRequest(_Sampling):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]] = Field(
        description="The prompt: text, or token ids (a list of one of either is accepted too).")
    suffix: Optional[str] = Field(default=None, description="Text to append after the completion.")
    max_tokens: Optional[int] = Field(default=16, ge=0, description="Tokens to generate at most.")
    echo: bool = Field(default=False, description="Echo the prompt before the completion.")
    logprobs: Optional[int] = Field(default=None, ge=0, description="Log-probabilities of this many top tokens.")
    best_of: Optional[int] = Field(default=1)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> Union[str, TokenIds]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts given: send one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("empty prompt")
        return prompt


class ChatMessage(BaseModel):
    """One message; its other keys (name, tool_calls, tool_call_id, ...) go to the chat template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    json_schema: Optional[dict[str, Any]] = None


class CreateChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    max_tokens: Optional[int] = Field(default=None, ge=0, description="Tokens to generate at most (default: "
                                      "until the context is full or the limit of the server).")
    logprobs: Optional[bool] = Field(default=False)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "CreateChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self


class CreateEmbeddingRequest(_Body):
    model: Optional[str] = Field(default=None)
    input: Union[str, list[str]] = Field(description="The text (or texts) to embed.")
    user: Optional[str] = Field(default=None)
    encoding_format: Optional[Literal["float", "base64"]] = Field(
        default=None, description="'float' (the default) or 'base64' (float32, what the openai client asks for).")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("empty input")
        return value


class TokenizeInputRequest(_Body):
    model: Optional[str] = Field(default=None)
    input: str = Field(description="The text to tokenize.")


class DetokenizeInputRequest(_Body):
    model: Optional[str] = Field(default=None)
    tokens: list[int] = Field(description="The token ids to turn into text.")
