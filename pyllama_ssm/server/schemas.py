"""Request bodies of the OpenAI-compatible routes, validated before any model work.

Field names and defaults follow llama_cpp.server's types.  As there, fields this
server does not know are ignored (clients written for llama-server send its own,
cache_prompt or n_predict; OpenAI's SDKs send newer ones): the log names each
once.  Values llama_cpp.server ignores or asserts on (n > 1, several prompts, an
empty prompt) are refused with the field named, and numbers sent as strings are
refused where llama_cpp.server converts them (the published schema says what is
accepted, and a fuzzer holds the server to it).  Every number's bounds come from
pyllama_ssm.limits (what llama.cpp accepts), narrowed where llama_cpp.server
narrows them; bounds that depend on the loaded models (token ids below n_vocab,
max_tokens_limit) are marked `x-limit` and filled in by the app's OpenAPI
schema, so the published schema accepts what the server accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..limits import field as limit

def _whole(value: Any) -> Any:
    """A JSON number with no fraction (16.0) is an integer, as JSON Schema counts them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return [_whole(v) for v in value] if isinstance(value, list) else value


TokenId = Annotated[int, Field(**limit("token"), json_schema_extra={"x-limit": "token"})]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class RequestBody(BaseModel):
    """A request body: fields it does not name are ignored (unknown_fields lists them), numbers sent as
    strings are refused."""
    # strict: a number sent as a string ("16") is refused, as the schema's types say
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False, strict=True)
    _unknown: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_unknown_names(cls, data: Any, handler: Any) -> Any:
        body = handler(data)
        if isinstance(data, dict) and isinstance(body, RequestBody):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            body._unknown = tuple(sorted(str(k) for k in data if k not in known))
        return body

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        """The body's top-level fields this server does not know (ignored)."""
        return self._unknown

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        return _whole(value)


class _Sampling(RequestBody):
    """The sampling fields shared by completions and chat completions."""

    model: Optional[str] = Field(default=None, description="The alias of a configured model (default: the first; "
                                                          "a server of one model answers under any name).")
    min_tokens: int = Field(default=0, **limit("min_tokens"),
                            description="Generate at least this many tokens (EOS suppressed).")
    temperature: float = Field(default=0.8, **limit("temperature", ge=0.0),
                               description="Randomness; 0 picks the most likely token.")
    top_p: float = Field(default=0.95, **limit("top_p"))
    min_p: float = Field(default=0.05, **limit("min_p"))
    stop: Optional[Union[str, list[str]]] = Field(default=None, description="Strings at which to stop generating.")
    stream: bool = Field(default=False, description="Stream the result as server-sent events.")
    presence_penalty: Optional[float] = Field(default=0.0, **limit("presence_penalty", ge=-2.0, le=2.0))
    frequency_penalty: Optional[float] = Field(default=0.0, **limit("frequency_penalty", ge=-2.0, le=2.0))
    logit_bias: Optional[dict[str, Annotated[float, Field(**limit("logit_bias"))]]] = Field(
        default=None, description="Token id (or text, with logit_bias_type='tokens') -> bias.")
    # any integer: the server takes it modulo 2**32 (a bound near 2**64 would be compared as a float by
    # JSON Schema validators and as an int here, so the two would disagree next to it)
    seed: Optional[int] = Field(default=None, description="Any integer, taken modulo 2**32 (-1: random).")
    n: Optional[int] = Field(default=1, ge=1, le=1, description="Only 1: send one request per completion.")
    user: Optional[str] = Field(default=None)
    # llama.cpp specific
    top_k: int = Field(default=40, **limit("top_k"), description="0: the whole vocabulary.")
    repeat_penalty: float = Field(default=1.1, **limit("repeat_penalty"))
    logit_bias_type: Optional[Literal["input_ids", "tokens"]] = Field(default=None)
    mirostat_mode: int = Field(default=0, **limit("mirostat_mode"))
    mirostat_tau: float = Field(default=5.0, **limit("mirostat_tau", le=10.0))
    mirostat_eta: float = Field(default=0.1, **limit("mirostat_eta", ge=0.001, le=1.0))
    grammar: Optional[str] = Field(default=None, description="A GBNF grammar the output must follow.")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        if isinstance(stop, list) and len(stop) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stop)}")
        return stop


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(RequestBody):
    include_usage: Optional[bool] = Field(default=None, description="A last chunk with `usage` and no choices.")
    include_obfuscation: Optional[bool] = Field(default=None, description="Accepted, ignored (no padding is sent).")


# fields of OpenAI's current API that change nothing here: accepted (clients send them), noted in the log
IGNORED_NOTE = "Accepted for OpenAI compatibility; ignored by this server."


def ignored_field(**bounds: Any) -> Any:
    """A field accepted for compatibility and ignored (noted in the log, marked x-ignored in the schema)."""
    return Field(default=None, description=IGNORED_NOTE, json_schema_extra={"x-ignored": True}, **bounds)


def ignored_names(cls: type[BaseModel]) -> set[str]:
    """The fields of a request body that this server accepts and ignores."""
    return {name for name, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("x-ignored")}


def ignored_fields(body: BaseModel) -> list[str]:
    """The ignored fields that body sets."""
    return sorted(name for name in ignored_names(type(body)) & body.model_fields_set if getattr(body, name) is not None)


class CreateCompletionRequest(_Sampling):
    prompt: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1, max_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=1)]] = Field(
        description="The prompt: text, or token ids (a list of one of either is accepted too).")
    suffix: Optional[str] = Field(default=None, description="Fill-in-the-middle: the text after the completion, "
                                                            "laid out with the model's FIM tokens (pyllama_ssm.fim).")
    max_tokens: Optional[int] = Field(default=16, **limit("max_tokens"), json_schema_extra={"x-limit": "max_tokens"},
                                      description="Tokens to generate at most (0: up to the context).")
    echo: bool = Field(default=False, description="Echo the prompt before the completion.")
    logprobs: Optional[int] = Field(default=None, **limit("logprobs"), json_schema_extra={"x-limit": "logprobs"},
                                    description="Log-probabilities of this many top tokens.")
    best_of: Optional[int] = Field(default=1, ge=1, le=1, description="Only 1.")
    stream_options: Optional[StreamOptions] = Field(default=None, description="With stream=true.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> Any:
        """The refusals the schema states, in words (before the union's one error per branch)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) != 1:
            raise ValueError(f"{len(prompt)} prompts given: send one prompt per request")
        if not prompt or (isinstance(prompt, list) and isinstance(prompt[0], (str, list)) and not prompt[0]):
            raise ValueError("empty prompt")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Union[str, list[int]]:
        return prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else prompt


class ChatMessage(BaseModel):
    """One message; its other keys (name, tool_calls, tool_call_id, ...) go to the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    json_schema: Optional[dict[str, Any]] = None


class CreateChatCompletionRequest(_Sampling):
    # top_logprobs needs logprobs=true: stated in the schema too
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    max_tokens: Optional[int] = Field(default=None, **limit("max_tokens"), json_schema_extra={"x-limit": "max_tokens"},
                                      description="Tokens to generate at most (default: until the context is "
                                                  "full or the limit of the server).")
    max_completion_tokens: Optional[int] = Field(
        default=None, **limit("max_tokens"), json_schema_extra={"x-limit": "max_tokens"},
        description="OpenAI's current name of max_tokens; it wins when both are given.")
    stream_options: Optional[StreamOptions] = Field(default=None, description="With stream=true.")
    parallel_tool_calls: Optional[bool] = ignored_field()  # every call the model writes is parsed and returned
    store: Optional[bool] = ignored_field()
    metadata: Optional[dict[str, str]] = ignored_field()
    modalities: Optional[list[Literal["text", "audio"]]] = ignored_field()
    audio: Optional[dict[str, Any]] = ignored_field()
    prediction: Optional[dict[str, Any]] = ignored_field()
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = ignored_field()
    service_tier: Optional[str] = ignored_field()
    verbosity: Optional[Literal["low", "medium", "high"]] = ignored_field()
    web_search_options: Optional[dict[str, Any]] = ignored_field()
    prompt_cache_key: Optional[str] = ignored_field()
    prompt_cache_retention: Optional[str] = ignored_field()
    safety_identifier: Optional[str] = ignored_field()
    logprobs: Optional[bool] = Field(default=False)
    top_logprobs: Optional[int] = Field(default=None, **limit("top_logprobs"))
    response_format: Optional[ResponseFormat] = None
    reasoning_format: Optional[Literal["auto", "none"]] = Field(
        default=None, description="none: keep the template's <think> text in content (default: the model's "
                                  "--reasoning_format).")
    parse_tool_calls: Optional[bool] = Field(default=None, description="false: keep <tool_call> markup in content.")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "CreateChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self


class CreateEmbeddingRequest(RequestBody):
    model: Optional[str] = Field(default=None)
    input: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)]] = Field(
        description="The text (or texts) to embed.")
    user: Optional[str] = Field(default=None)
    encoding_format: Optional[Literal["float", "base64"]] = Field(
        default=None, description="'float' (the default) or 'base64' (float32, what the openai client asks for).")

    @field_validator("input", mode="before")
    @classmethod
    def _not_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("empty input")
        return value


class TokenizeInputRequest(RequestBody):
    model: Optional[str] = Field(default=None)
    input: str = Field(description="The text to tokenize.")


class DetokenizeInputRequest(RequestBody):
    model: Optional[str] = Field(default=None)
    tokens: list[TokenId] = Field(description="The token ids to turn into text.")
