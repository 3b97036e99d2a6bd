"""Server and model settings: llama_cpp.server's names and defaults, plus our limits.

Settings come from command-line flags or a config file (JSON or YAML, the shape
of llama_cpp.server's: server fields at the top level and a `models` list).
Unlike llama_cpp.server, environment variables (MODEL, HOST, PORT, ...) are not
read: a stray HOST in the environment must not move the server off loopback.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_SPLIT_MODE_LAYER = 1
LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1

_CPUS = max(multiprocessing.cpu_count(), 1)


class _Strict(BaseModel):
    # unknown keys in a config file are errors that name the key; "model_*" names are ours
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class ModelSettings(_Strict):
    """How to load one model: the keyword arguments of Llama (llama_cpp.server's ModelSettings)."""

    model: str = Field(description="The path to the model to use for generating completions.")
    model_alias: Optional[str] = Field(
        default=None, description="The name clients use for the model (default: the model path).")
    n_parallel: int = Field(
        default=4, ge=1, le=256,
        description="Sequences served at once from one context (continuous batching); more queue.")
    # Model params
    n_gpu_layers: int = Field(default=0, ge=-1, description="Layers on the GPU (-1: all).")
    split_mode: int = Field(default=LLAMA_SPLIT_MODE_LAYER, description="The split mode to use.")
    main_gpu: int = Field(default=0, ge=0, description="Main GPU to use.")
    tensor_split: Optional[list[float]] = Field(default=None, description="Split layers across GPUs in proportion.")
    vocab_only: bool = Field(default=False, description="Whether to only return the vocabulary.")
    use_mmap: bool = Field(default=True, description="Use mmap.")
    use_mlock: bool = Field(default=True, description="Use mlock.")
    kv_overrides: Optional[list[str]] = Field(
        default=None, description="Model kv overrides, key=type:value with type bool, int, float or str.")
    rpc_servers: Optional[Union[str, list[str]]] = Field(
        default=None, description="ggml-rpc-server endpoints (host:port, comma separated) that take layers.")
    # Context params
    seed: int = Field(default=LLAMA_DEFAULT_SEED, description="Random seed. -1 for random.")
    n_ctx: int = Field(default=2048, ge=0, description="The context size.")
    n_batch: int = Field(default=512, ge=1, description="The batch size to use per eval.")
    n_ubatch: int = Field(default=512, ge=1, description="The physical batch size used by llama.cpp.")
    n_threads: int = Field(default=max(_CPUS // 2, 1), ge=1, description="Threads to use (-1: all CPUs).")
    n_threads_batch: int = Field(default=_CPUS, ge=0, description="Threads for batch processing (-1: all CPUs).")
    rope_scaling_type: int = Field(default=LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED)
    rope_freq_base: float = Field(default=0.0, description="RoPE base frequency.")
    rope_freq_scale: float = Field(default=0.0, description="RoPE frequency scaling factor.")
    yarn_ext_factor: float = Field(default=-1.0)
    yarn_attn_factor: float = Field(default=1.0)
    yarn_beta_fast: float = Field(default=32.0)
    yarn_beta_slow: float = Field(default=1.0)
    yarn_orig_ctx: int = Field(default=0)
    mul_mat_q: bool = Field(default=True, description="If true, use experimental mul_mat_q kernels.")
    logits_all: bool = Field(default=True, description="Whether to return logits.")
    embedding: bool = Field(default=False, description="Whether to use embeddings.")
    offload_kqv: bool = Field(default=True, description="Whether to offload kqv to the GPU.")
    flash_attn: Optional[bool] = Field(
        default=None, description="Whether to use flash attention (default: auto, as llama-server, for "
        "every n_parallel: llama_cpp.server's is off).")
    batch_invariant: Optional[bool] = Field(
        default=None, description="Each answer independent of what else runs, of the prefix cache and of "
        "n_parallel, bit for bit (CPU kernels, flash attention). Default: on where the build has it; "
        "false: llama.cpp's fastest kernel per shape.")
    prefix_cache: Optional[int] = Field(
        default=None, ge=0, le=256,
        description="Prompt prefixes the Engine keeps (n_parallel > 1; null: 32, or 3 per sequence if more).")
    prefix_cache_bytes: Optional[int] = Field(
        default=256 << 20, ge=0, description="Bytes the Engine's prefix cache may add: its recurrent snapshots (n_parallel > 1; null: no bound; "
        "attention prefixes stay in the KV cache, allocated whole).")
    # Sampling params
    last_n_tokens_size: int = Field(default=64, ge=0, description="Last n tokens kept for repeat penalty.")
    # LoRA params
    lora_base: Optional[str] = Field(default=None, description="Optional path to the base model of a LoRA.")
    lora_path: Optional[str] = Field(default=None, description="Path to a LoRA file to apply to the model.")
    # Backend params
    numa: Union[bool, int] = Field(default=False, description="Enable NUMA support.")
    # Chat format params
    chat_format: Optional[str] = Field(default=None, description="Chat format to use.")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(
        default=None, description="Extra keyword arguments forwarded to the chat template.")
    clip_model_path: Optional[str] = Field(default=None, description="Path to a CLIP model (multimodal chat).")
    reasoning_format: Literal["auto", "none"] = Field(
        default="auto", description="auto: a template's <think> text becomes reasoning_content; none: kept in content.")
    parse_tool_calls: bool = Field(default=True, description="Parse the template's <tool_call> markup into tool_calls.")
    spm_infill: bool = Field(default=False, description="Fill-in-the-middle prompts with the suffix first "
                             "(<fim_suf>suffix<fim_pre>prefix<fim_mid>; llama-server's --spm-infill).")
    # Cache params
    cache: bool = Field(default=False, description="Use a cache to reduce processing times for evaluated prompts.")
    cache_type: Literal["ram", "disk"] = Field(default="ram", description="The type of cache to use.")
    cache_size: int = Field(default=2 << 30, description="The size of the cache in bytes.")
    # Tokenizer options
    hf_tokenizer_config_path: Optional[str] = Field(default=None, description="A HuggingFace tokenizer_config.json.")
    hf_pretrained_model_name_or_path: Optional[str] = Field(default=None, description="A HuggingFace tokenizer.")
    hf_model_repo_id: Optional[str] = Field(default=None, description="Load the model from this HuggingFace repo.")
    # Speculative decoding
    draft_model: Optional[str] = Field(default=None, description="Speculative decoding method.")
    draft_model_num_pred_tokens: int = Field(default=10, description="Tokens to predict with the draft model.")
    # KV cache quantization
    type_k: Optional[int] = Field(default=None, description="Type of the key cache quantization.")
    type_v: Optional[int] = Field(default=None, description="Type of the value cache quantization.")
    # Misc
    verbose: bool = Field(default=True, description="Whether to print debug information.")

    @model_validator(mode="before")
    @classmethod
    def _all_cpus(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("n_threads", "n_threads_batch"):
                if values.get(key) == -1:
                    values = {**values, key: _CPUS}
        return values

    @property
    def alias(self) -> str:
        return self.model_alias or self.model


class ServerSettings(_Strict):
    """How to serve: uvicorn and FastAPI settings (llama_cpp.server's), plus limits of ours."""

    host: str = Field(default="127.0.0.1", description="Listen address (loopback unless told otherwise).")
    port: int = Field(default=8000, ge=0, le=65535, description="Listen port.")
    ssl_keyfile: Optional[str] = Field(default=None, description="SSL key file for HTTPS.")
    ssl_certfile: Optional[str] = Field(default=None, description="SSL certificate file for HTTPS.")
    api_key: Optional[str] = Field(
        default=None, description="API key: when set, every route but /health needs 'Authorization: Bearer KEY'.")
    interrupt_requests: bool = Field(
        default=True, description="Accepted for compatibility; requests run in parallel, nothing is interrupted.")
    disable_ping_events: bool = Field(default=False, description="Disable EventSource pings.")
    root_path: str = Field(default="", description="The root path when running behind a reverse proxy.")
    # ours
    cors_origins: Optional[list[str]] = Field(
        default=None, description="Origins allowed by CORS ('*' for any). CORS is off when unset.")
    max_queued_requests: int = Field(
        default=64, ge=0, description="Requests that may wait per model beyond n_parallel; more get 429.")
    max_request_bytes: int = Field(default=8 << 20, ge=1, description="Largest request body accepted (413 above).")
    max_tokens_limit: Optional[int] = Field(
        default=None, ge=1, description="Largest max_tokens a request may ask for (default: the context size).")
    shutdown_timeout: float = Field(
        default=10.0, ge=0, description="Seconds in-flight requests get to finish on SIGINT/SIGTERM before cancel.")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("api_key: must not be empty (leave it unset to disable authentication)")
        return v


class Settings(ServerSettings, ModelSettings):
    """One model served: every flag of the command line."""


class ConfigFileSettings(ServerSettings):
    """The config file: server settings and the models, each chosen by its alias."""

    models: list[ModelSettings] = Field(default=[], description="Model configs")

    @field_validator("models")
    @classmethod
    def _unique_aliases(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        if not models:
            raise ValueError("models: the config file lists no model")
        seen: set[str] = set()
        for m in models:
            if m.alias in seen:
                raise ValueError(f"models: alias {m.alias!r} is used twice")
            seen.add(m.alias)
        return models


def load_config_file(path: str | Path) -> tuple[ServerSettings, list[ModelSettings]]:
    """Read a JSON or YAML (.yaml/.yml) config file; errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror or e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only needed for YAML configs

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path}: invalid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        config = ConfigFileSettings.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"config file {path}: {describe(e)}") from None
    server = ServerSettings.model_validate(config.model_dump(exclude={"models"}))
    return server, config.models


def describe(error: ValidationError) -> str:
    """One line per invalid field: 'field.path: reason'."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in error.errors())


# -- command line -----------------------------------------------------------------------------

def _base_type(annotation: Any) -> tuple[Any, bool, bool]:
    """(scalar type, is a list, is a dict) of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is Literal:
        return type(typing.get_args(annotation)[0]), False, False
    if origin is list:
        return _base_type(typing.get_args(annotation)[0])[0], True, False
    if origin is dict:
        return dict, False, True
    return annotation, False, False


def parse_bool(arg: str) -> bool:
    value = arg.strip().lower()
    if value in {"1", "on", "t", "true", "y", "yes"}:
        return True
    if value in {"0", "off", "f", "false", "n", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {arg!r} (true/false, yes/no, 1/0, on/off)")


def parse_json_object(arg: str) -> dict[str, Any]:
    try:
        value = json.loads(arg)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {arg!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {arg!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One --flag per field (also spelled with dashes), typed from its annotation; booleans take a value."""
    for name, field in model.model_fields.items():
        help_text = field.description or ""
        if not field.is_required() and field.default is not None:
            help_text += f" (default: {field.default})"
        scalar, is_list, is_dict = _base_type(field.annotation)
        kind = parse_json_object if is_dict else parse_bool if scalar is bool else scalar
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if name == "n_parallel":
            flags.append("--parallel")  # llama.cpp's server spells it so
        parser.add_argument(*flags, dest=name, type=kind, nargs="*" if is_list else None,
                            help=help_text.replace("%", "%%"))


def settings_from_args(args: argparse.Namespace) -> tuple[ServerSettings, list[ModelSettings]]:
    """Settings from parsed flags, or from --config_file when given (its settings then replace the flags)."""
    if args.config_file:
        return load_config_file(args.config_file)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config_file"}
    if "model" not in given:
        raise ValueError("--model: required (the path of a GGUF file), or give --config_file")
    try:
        return (ServerSettings(**{k: v for k, v in given.items() if k in ServerSettings.model_fields}),
                [ModelSettings(**{k: v for k, v in given.items() if k in ModelSettings.model_fields})])
    except ValidationError as e:
        raise ValueError(describe(e)) from None
