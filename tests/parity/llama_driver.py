"""The same llama_cpp calls for stock llama-cpp-python and pyllama-ssm; prints JSON.

    python llama_driver.py tokens VOCAB.gguf [VOCAB.gguf ...]
    python llama_driver.py completions MODEL.gguf
    python llama_driver.py embeddings MODEL.gguf
    python llama_driver.py templates TEMPLATE.jinja [TEMPLATE.jinja ...]

`import llama_cpp` is whichever package the caller installed (tests/parity/stock.py:
run_stock or run_ours).  Bytes are hex, numpy scalars plain numbers, and response ids
and timestamps blanked, so the two outputs compare as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llama_cpp
import llama_cpp.llama_chat_format as chat_format
import numpy as np

EXTRA_TEXTS = ["Hello world", " Hello World!", "<s>Hello</s> <|im_start|>user\nHi<|im_end|>", "a\n\n\tb  c",
               "emoji 🦙 and ünïcødé", "1234567890 3.14159", ""]
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time, in a land"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["ok", "color"]}


def plain(x):
    """JSON-ready: numpy scalars as numbers, response ids/timestamps blanked."""
    if isinstance(x, dict):
        return {k: ("" if k in ("id", "created") else plain(v)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def types_of(x):
    """The structure of a response: keys and leaf type names (numpy floats count as float)."""
    if isinstance(x, dict):
        return {k: types_of(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [types_of(v) for v in x]
    if isinstance(x, np.floating):
        return "float"
    return type(x).__name__


def tokens(paths: list[str]) -> dict:
    out = {}
    for path in paths:
        inp = Path(path + ".inp")
        texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n") if inp.exists() else []
        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        rows = []
        for text in texts + EXTRA_TEXTS:
            data = text.encode("utf-8")
            row = {}
            for add_bos in (True, False):
                for special in (True, False):
                    ids = llm.tokenize(data, add_bos=add_bos, special=special)
                    row[f"{add_bos}/{special}"] = [ids, llm.detokenize(ids).hex(),
                                                   llm.detokenize(ids, special=True).hex()]
            rows.append(row)
        out[Path(path).name] = {"bos": llm.token_bos(), "eos": llm.token_eos(), "n_vocab": llm.n_vocab(),
                                "rows": rows}
        llm.close()
    return out


def completions(path: str) -> dict:
    # stock's settings on both sides: no flash attention, llama.cpp's fastest kernel per shape (stock ignores
    # batch_invariant, an unknown keyword to it)
    llm = llama_cpp.Llama(path, n_ctx=512, logits_all=True, seed=1234, flash_attn=False, batch_invariant=False,
                          verbose=False)
    out = {}

    def record(name, response):
        out[name] = {"value": plain(response), "types": types_of(response)}

    # first, on the fresh object: stock's sample() reuses the last completion's sampler
    ids = llm.tokenize(PROMPTS[1].encode())
    llm.eval(ids)
    first = llm.sample(temp=0.0)
    generated = []
    for token in llm.generate(ids, temp=0.0):
        generated.append(token)
        if len(generated) == 6:
            break
    record("generate", [first, generated, llm.n_tokens, llm.input_ids[: llm.n_tokens].tolist(),
                        plain(llm.scores[llm.n_tokens - 1, :8].tolist())])

    for i, prompt in enumerate(PROMPTS):
        greedy = llm.create_completion(prompt, max_tokens=16, temperature=0, logprobs=3)
        record(f"greedy/{i}", greedy)
        text = greedy["choices"][0]["text"]
        if len(text) > 8:
            stop = text[len(text) // 2: len(text) // 2 + 3]
            record(f"stop/{i}", llm.create_completion(prompt, max_tokens=16, temperature=0, stop=[stop]))
            chunks = list(llm.create_completion(prompt, max_tokens=16, temperature=0, stop=[stop], stream=True))
            record(f"stream-stop/{i}", ["".join(c["choices"][0]["text"] for c in chunks),
                                        chunks[-1]["choices"][0]["finish_reason"]])
        chunks = list(llm.create_completion(prompt, max_tokens=16, temperature=0, stream=True))
        record(f"stream/{i}", ["".join(c["choices"][0]["text"] for c in chunks),
                               chunks[-1]["choices"][0]["finish_reason"], sorted(chunks[0]), sorted(chunks[-1])])
    record("echo", llm.create_completion(PROMPTS[0], max_tokens=4, temperature=0, logprobs=2, echo=True))
    record("tokens-prompt", llm.create_completion(llm.tokenize(PROMPTS[1].encode()), max_tokens=8, temperature=0))
    record("seeded", llm.create_completion(PROMPTS[0], max_tokens=16, temperature=0.8, seed=42))
    record("seed-chain", [llm.create_completion(PROMPTS[0], max_tokens=8, temperature=1.0)["choices"][0]["text"]
                          for _ in range(3)])
    record("penalties", llm.create_completion(PROMPTS[2], max_tokens=16, temperature=0, repeat_penalty=1.3,
                                              frequency_penalty=0.5, presence_penalty=0.5))
    record("mirostat", llm.create_completion(PROMPTS[0], max_tokens=12, temperature=0.7, mirostat_mode=2, seed=7))
    record("negative-temperature", llm.create_completion(PROMPTS[0], max_tokens=8, temperature=-1, seed=3))
    record("logit-bias", llm.create_completion(PROMPTS[0], max_tokens=6, temperature=0,
                                               logit_bias={llm.tokenize(b"zebra", add_bos=False)[0]: 50.0}))
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA))
    record("grammar", llm.create_completion("JSON:", max_tokens=48, temperature=0, grammar=grammar))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    record("chat", llm.create_chat_completion(messages, max_tokens=12, temperature=0))
    chunks = list(llm.create_chat_completion(messages, max_tokens=12, temperature=0, stream=True))
    record("chat-stream", [types_of(chunks[0]), "".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                           chunks[-1]["choices"][0]["finish_reason"]])
    record("chat-json", llm.create_chat_completion(messages, max_tokens=48, temperature=0,
                                                   response_format={"type": "json_object", "schema": SCHEMA}))
    tools = [{"type": "function", "function": {"name": "paint", "parameters": SCHEMA}}]
    record("chat-tool", llm.create_chat_completion(messages, max_tokens=48, temperature=0, tools=tools,
                                                   tool_choice={"type": "function",
                                                                "function": {"name": "paint"}}))
    for fmt in ("chatml", "llama-2", "mistral-instruct"):  # named formats, looked up at each call
        llm.chat_format = fmt
        record(f"chat/{fmt}", llm.create_chat_completion(messages[1:], max_tokens=6, temperature=0))
    llm.close()
    return out


def embeddings(path: str) -> dict:
    out = {}
    for pooling in (llama_cpp.LLAMA_POOLING_TYPE_MEAN, llama_cpp.LLAMA_POOLING_TYPE_NONE):
        llm = llama_cpp.Llama(path, n_ctx=256, embedding=True, pooling_type=pooling, flash_attn=False,
                              batch_invariant=False, verbose=False)
        out[f"{pooling}/embed"] = plain(llm.embed(["Hello world", "A different prompt"]))
        out[f"{pooling}/normalized"] = plain(llm.embed("Hello world", normalize=True))
        response = llm.create_embedding(["Hello world", "A different prompt"])
        out[f"{pooling}/response"] = {"value": plain(response), "types": types_of(response)}
        llm.close()
    return out


def templates(paths: list[str]) -> dict:
    """Each template rendered by Jinja2ChatFormatter: plain chat and with tools (or the error it raises)."""
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Paint it red"}]
    tools = [{"type": "function", "function": {"name": "paint", "description": "Paint", "parameters": SCHEMA}}]
    out = {}
    for path in paths:
        rendered = []
        for kwargs in ({}, {"tools": tools}):
            try:
                formatter = chat_format.Jinja2ChatFormatter(Path(path).read_text(), eos_token="</s>", bos_token="<s>")
                result = formatter(messages=conversation, **kwargs)
                rendered.append([result.prompt, result.stop, result.added_special])
            except Exception as e:  # both sides must fail alike
                rendered.append(["error", type(e).__name__])
        out[Path(path).name] = rendered
    return out


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    result = {"tokens": lambda: tokens(args), "completions": lambda: completions(args[0]),
              "embeddings": lambda: embeddings(args[0]), "templates": lambda: templates(args)}[what]()
    json.dump(result, sys.stdout)
