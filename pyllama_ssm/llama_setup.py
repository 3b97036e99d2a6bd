"""How a Llama is set up from llama-cpp-python's arguments: model parameters, a LoRA adapter, the chat
handlers of the model's own templates, and Llama.from_pretrained's download.  Functions of the facade's
arguments, apart from it so that pyllama_ssm.llama holds only the facade.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from . import llama_chat_format
from .batch import Batch
from .bindings import ffi, lib
from .context import Context, ContextParams
from .engine import Engine, EngineConfig
from .model import Model


def init_numa(numa: Union[bool, int]) -> int:
    """The NUMA strategy of Llama(numa=) (True: distribute), set up for the process unless disabled."""
    strategy = (lib.GGML_NUMA_STRATEGY_DISTRIBUTE if numa else lib.GGML_NUMA_STRATEGY_DISABLED) \
        if isinstance(numa, bool) else numa
    if strategy != lib.GGML_NUMA_STRATEGY_DISABLED:
        lib.llama_numa_init(strategy)
    return strategy


def model_params(split_mode: int, main_gpu: int, tensor_split, use_mmap: bool, use_mlock: bool,
                 kv_overrides) -> dict[str, Any]:
    """llama_model_params fields beyond those Model takes by name; the arrays live as long as the dict."""
    load_mode = {(True, True): lib.LLAMA_LOAD_MODE_MMAP_MLOCK, (False, True): lib.LLAMA_LOAD_MODE_MLOCK,
                 (True, False): lib.LLAMA_LOAD_MODE_MMAP, (False, False): lib.LLAMA_LOAD_MODE_NONE}
    params: dict[str, Any] = dict(split_mode=split_mode, main_gpu=main_gpu,
                                  load_mode=load_mode[(bool(use_mmap), bool(use_mlock))])
    if tensor_split is not None:
        params["tensor_split"] = ffi.new("float[]", [float(x) for x in tensor_split] +
                                         [0.0] * (lib.llama_max_devices() - len(tensor_split)))
    if kv_overrides:
        params["kv_overrides"] = kv_override_array(kv_overrides)
    return params


def load_lora(model: Model, path: str, scale: float, ctx: Optional[Context], engine: Optional[Engine]):
    """The adapter at path, applied to the context and the Engine's (that one only from its own thread,
    between steps); ValueError when llama.cpp refuses it."""
    if not Path(path).is_file():
        raise ValueError(f"lora_path {path}: no such file")
    adapter = lib.llama_adapter_lora_init(model.ptr, path.encode())
    if adapter == ffi.NULL:
        raise ValueError(f"lora_path {path}: llama.cpp could not load it as a LoRA adapter for this model")
    adapters, scales = ffi.new("struct llama_adapter_lora *[1]", [adapter]), ffi.new("float[1]", [scale])
    targets = ([(ctx, None)] if ctx is not None else []) + ([(engine.ctx, engine)] if engine is not None else [])
    for target, owner in targets:
        apply = lambda target=target: lib.llama_set_adapters_lora(target.ptr, adapters, 1, scales)  # noqa: E731
        if (owner.call(apply) if owner is not None else apply()) != 0:
            lib.llama_adapter_lora_free(adapter)
            raise ValueError(f"lora_path {path}: llama.cpp could not apply the adapter")
    return adapter


def chat_handlers(model: Model, metadata: dict[str, str]) -> dict[str, Any]:
    """The model's own templates as handlers "chat_template.<name>" ("chat_template.default": its main one)."""
    eos, bos = model.token_eos, model.token_bos
    eos_text = ffi.string(lib.llama_vocab_get_text(model.vocab, eos)).decode() if eos != -1 else ""
    bos_text = ffi.string(lib.llama_vocab_get_text(model.vocab, bos)).decode() if bos != -1 else ""
    templates = {"chat_template." + k.removeprefix("tokenizer.chat_template."): v for k, v in
                 metadata.items() if k.startswith("tokenizer.chat_template.")}
    if "tokenizer.chat_template" in metadata:
        templates["chat_template.default"] = metadata["tokenizer.chat_template"]
    return {name: llama_chat_format.Jinja2ChatFormatter(template, eos_token=eos_text, bos_token=bos_text,
                                                        stop_token_ids=[eos]).to_chat_handler()
            for name, template in templates.items()}


def default_chat_format(metadata: dict[str, str], handlers: dict[str, Any]) -> str:
    guessed = llama_chat_format.guess_chat_format_from_gguf_metadata(metadata)
    return guessed or ("chat_template.default" if "chat_template.default" in handlers else "llama-2")


def download(repo_id: str, filename: Optional[str], additional_files: Optional[list] = None,
             local_dir: Optional[Union[str, os.PathLike]] = None,
             local_dir_use_symlinks: Union[bool, Literal["auto"]] = "auto",
             cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """Download a GGUF file (glob `filename`) and additional_files from the Hugging Face hub; its path."""
    try:
        from huggingface_hub import HfFileSystem, hf_hub_download
    except ImportError:
        raise ImportError("Llama.from_pretrained needs the huggingface-hub package "
                          "(pip install huggingface-hub); or download the GGUF file and pass its path as "
                          "Llama(model_path=...)") from None
    try:
        files = [str(Path(f["name"] if isinstance(f, dict) else f).relative_to(repo_id))
                 for f in HfFileSystem().ls(repo_id, recursive=True)]
    except Exception as e:  # the hub client raises many kinds of network errors
        raise ConnectionError(f"Llama.from_pretrained({repo_id!r}): the Hugging Face hub is not reachable "
                              f"({type(e).__name__}: {e}); download the GGUF file yourself and pass its "
                              f"path as Llama(model_path=...)") from e

    def fetch(pattern: str) -> str:
        matches = [f for f in files if fnmatch.fnmatch(f, pattern)]
        if len(matches) != 1:
            raise ValueError(f"{repo_id}: {len(matches)} files match {pattern!r} (need exactly one); "
                             f"files: {json.dumps(files)}")
        path = Path(matches[0])
        return hf_hub_download(repo_id=repo_id, filename=path.name, subfolder=str(path.parent),
                               local_dir=local_dir, local_dir_use_symlinks=local_dir_use_symlinks,
                               cache_dir=cache_dir)

    model_path = fetch(filename)
    for pattern in additional_files or []:  # further shards, next to the first one
        fetch(pattern)
    return model_path


def kv_override_array(overrides: dict[str, Union[bool, int, float, str]]):
    """llama_model_kv_override[] (zero-terminated) for Llama(kv_overrides=...)."""
    arr = ffi.new("struct llama_model_kv_override[]", len(overrides) + 1)
    for item, (key, value) in zip(arr, overrides.items()):
        raw = key.encode("utf-8")
        if not 0 < len(raw) < 128:
            raise ValueError(f"kv_overrides: key {key!r} must be 1..127 bytes")
        item.key = raw
        if isinstance(value, bool):
            item.tag, item.val_bool = lib.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            item.tag, item.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            item.tag, item.val_f64 = lib.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        elif isinstance(value, str):
            data = value.encode("utf-8")
            if len(data) >= 128:
                raise ValueError(f"kv_overrides: value of {key!r} is {len(data)} bytes, at most 127")
            item.tag, item.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, data
        else:
            raise TypeError(f"kv_overrides: value of {key!r} must be bool, int, float or str, "
                            f"not {type(value).__name__}")
    return arr


def check_arguments(n_parallel, n_ctx: int, n_batch: int, n_ubatch: int, draft_model, lora_base, tensor_split,
                    last_n_tokens_size: int) -> None:
    """Llama's arguments that are wrong before anything is loaded: ValueError naming them."""
    if not isinstance(n_parallel, int) or n_parallel < 1:
        raise ValueError(f"n_parallel={n_parallel!r}: must be an int >= 1")
    if n_ctx < 0 or n_batch < 1 or n_ubatch < 1:
        raise ValueError(f"n_ctx={n_ctx}, n_batch={n_batch}, n_ubatch={n_ubatch}: n_ctx must be >= 0 "
                         f"(0 = the model's training context), batch sizes >= 1")
    if draft_model is not None and not callable(draft_model):
        raise ValueError(f"draft_model={draft_model!r}: expected a LlamaDraftModel (a callable from the token "
                         "ids so far to proposed next ids, e.g. llama_cpp.llama_speculative.LlamaPromptLookupDecoding)")
    if lora_base is not None:
        raise ValueError("lora_base: not supported (llama.cpp applies a LoRA to the loaded model itself)")
    if tensor_split is not None and len(tensor_split) > lib.llama_max_devices():
        raise ValueError(f"tensor_split: {len(tensor_split)} entries, at most {lib.llama_max_devices()} devices")
    if last_n_tokens_size < -1:
        raise ValueError(f"last_n_tokens_size={last_n_tokens_size}: must be >= -1")


def context_params(arguments: dict[str, Any]) -> ContextParams:
    """The context settings among Llama's arguments (by their names there), checked (ContextError naming one)."""
    rope_scaling = arguments["rope_scaling_type"]
    return ContextParams.of({
        "rope_scaling_type": lib.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED if rope_scaling is None else rope_scaling,
        **{name: arguments[name] for name in ("pooling_type", "attention_type", "rope_freq_base", "rope_freq_scale",
                                              "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow",
                                              "yarn_orig_ctx", "offload_kqv", "no_perf", "op_offload", "swa_full",
                                              "type_k", "type_v")}})


def open_runtime(stack, model: Model, *, n_parallel: int, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int,
                 n_threads_batch: int, embedding: bool, vocab_only: bool, flash_attn, batch_invariant: Optional[bool],
                 overrides: ContextParams, draft_snapshots: bool, engine: dict[str, Any]):
    """(the single-sequence or embedding context, its batch, the inline Engine of one sequence on it that
    runs the Session's completions, the Engine): what Llama runs on, each closed by `stack` (an ExitStack)
    should a later step fail.  n_parallel == 1 (or embeddings): a context of its own; n_parallel > 1: an
    Engine.  vocab_only: a tokenizer; with n_parallel == 1 a context too, as stock makes one (it holds no
    weights and costs nothing), so _ctx.ctx exists for low-level callers."""
    ctx = batch = single = runner = None
    if (n_parallel == 1 or embedding) and not (vocab_only and n_parallel > 1):
        # embeddings batch many inputs as sequences of one context, as llama-cpp-python does
        ctx = Context(model, n_ctx=n_ctx if n_parallel == 1 else n_batch, n_batch=n_batch,
                      n_ubatch=min(n_batch, n_ubatch),
                      n_seq_max=min(n_batch, lib.llama_max_parallel_sequences()) if embedding else 1,
                      n_threads=n_threads, n_threads_batch=n_threads_batch, kv_unified=embedding,
                      flash_attn=flash_attn, embeddings=embedding, n_rs_pool=int(draft_snapshots),
                      batch_invariant=batch_invariant, overrides=overrides)
        stack.callback(ctx.close)
        batch = Batch(n_batch, 1)
        stack.callback(batch.close)
        if n_parallel == 1 and not vocab_only:  # the Session's completions: one sequence, memory kept by it
            single = Engine(model, EngineConfig(
                n_ctx=ctx.n_ctx, parallel=1, n_batch=n_batch, n_threads=n_threads, n_threads_batch=n_threads_batch,
                flash_attn=flash_attn, batch_invariant=batch_invariant, prefix_cache=0,
                draft_model=engine["draft_model"], draft_max_seqs=engine["draft_max_seqs"]), context=ctx, inline=True)
            stack.callback(single.close)
    if not vocab_only and n_parallel > 1:
        # flash attention unless refused (llama-server's default): with batch_invariant, a request's
        # output then does not depend on the other sequences of the shared KV cache
        runner = Engine(model, EngineConfig(
            n_ctx=n_ctx, parallel=n_parallel, n_batch=n_batch, n_ubatch=min(n_batch, n_ubatch), n_threads=n_threads,
            n_threads_batch=n_threads_batch, flash_attn=flash_attn, batch_invariant=batch_invariant,
            context_overrides=overrides, **engine))
        stack.callback(runner.close)
    return ctx, batch, single, runner
