"""The llama-cpp-python clients (LangChain, outlines, guidance) on whatever `import llama_cpp` is.

    python clients_driver.py MODEL LLAMA_KWARGS CLIENT...   (CLIENT: langchain, outlines, guidance)

LLAMA_KWARGS (JSON) go to every Llama the clients make, over the common ones below; "plain_kernels":
true loads the weights without ggml's extra buffer types on stock's side too.

Prints one JSON object: case name -> the client's output, greedy, or {"error": "Type: message"} when
the client raised (so a failure on one side shows as a difference, with its reason).  With
n_parallel > 1 every case runs from several threads at once on one shared client, and its value is
the list of the threads' outputs.  tests/test_clients.py runs it on stock llama-cpp-python and on
pyllama-ssm and compares.
"""

from __future__ import annotations

import json
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

warnings.filterwarnings("ignore")  # langchain-community's sunset notice and friends, on stderr

import llama_cpp  # noqa: E402

MODEL, CLIENTS = sys.argv[1], sys.argv[3:]
LLAMA = {**dict(n_ctx=1024, n_batch=256, n_threads=1, seed=1, verbose=False, flash_attn=False, batch_invariant=False),
         **json.loads(sys.argv[2])}
if LLAMA.pop("plain_kernels", False):
    # ggml's plain kernels, as batch_invariant loads them (no AMX or repacked weights): stock has no
    # keyword for it, so its default model parameters say so (ours ignores this function)
    _defaults = llama_cpp.llama_cpp.llama_model_default_params

    def _plain_defaults():
        params = _defaults()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama_cpp.llama_model_default_params = _plain_defaults
THREADS = 4 if LLAMA.get("n_parallel", 1) > 1 else 1
MAX_TOKENS = 16
PROMPT = "The three primary colors are"
QUESTION = "Name one fruit."


def error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def run(cases: dict, out: dict, failed: dict | None = None) -> None:
    """Each case once, or from THREADS threads at once (each thread's output, in a list); every case
    answers the error `failed` when the client could not be made."""
    for name, case in cases.items():
        if failed is not None:
            out[name] = failed if THREADS == 1 else [failed] * THREADS
            continue
        def attempt():
            try:
                return case()
            except Exception as exc:  # noqa: BLE001 - the difference is the test's finding
                return error(exc)
        if THREADS == 1:
            out[name] = attempt()
        else:
            with ThreadPoolExecutor(THREADS) as pool:
                out[name] = [f.result() for f in [pool.submit(attempt) for _ in range(THREADS)]]


def message(msg) -> dict:
    """A LangChain AIMessage as plain data (no run ids)."""
    return {"content": msg.content, "tool_calls": [{k: c[k] for k in ("name", "args")} for c in msg.tool_calls],
            "invalid_tool_calls": [{k: c[k] for k in ("name", "args")} for c in msg.invalid_tool_calls]}


def langchain(out: dict) -> None:
    from langchain_community.chat_models import ChatLlamaCpp
    from langchain_community.llms import LlamaCpp
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    class Fruit(BaseModel):
        name: str
        color: str

    fields = ("n_ctx", "n_batch", "n_threads", "seed", "verbose")  # LlamaCpp's own fields; the rest: model_kwargs
    common = dict(model_path=MODEL, temperature=0, max_tokens=MAX_TOKENS, **{k: LLAMA[k] for k in fields},
                  model_kwargs={k: v for k, v in LLAMA.items() if k not in fields})
    failed = None
    try:
        llm = LlamaCpp(streaming=False, **common)
        chat = ChatLlamaCpp(**common)
        # LlamaCpp(grammar=GBNF) builds llama_cpp.LlamaGrammar itself and passes it to every completion
        constrained = LlamaCpp(streaming=False, grammar='root ::= "yes" | "no"', **common)
        # the dict form: langchain-community 0.4.2 passes a bare name through, which llama_cpp ignores
        tools = chat.bind_tools([get_weather], tool_choice={"type": "function", "function": {"name": "get_weather"}})
        structured = chat.with_structured_output(Fruit, include_raw=True)
    except Exception as exc:  # noqa: BLE001
        failed = error(exc)

    def structured_invoke():
        got = structured.invoke(QUESTION)
        return {"raw": message(got["raw"]), "parsed": got["parsed"] and got["parsed"].model_dump(),
                "parsing_error": got["parsing_error"] and type(got["parsing_error"]).__name__}

    run({"langchain.llm.invoke": lambda: llm.invoke(PROMPT),
         "langchain.llm.stream": lambda: list(llm.stream(PROMPT)),
         "langchain.llm.grammar": lambda: constrained.invoke("Is the sky blue? Answer yes or no:"),
         "langchain.chat.invoke": lambda: message(chat.invoke([HumanMessage(QUESTION)])),
         "langchain.chat.stream": lambda: [c.content for c in chat.stream([HumanMessage(QUESTION)])],
         "langchain.chat.bind_tools": lambda: message(tools.invoke("What is the weather in Paris?")),
         "langchain.chat.with_structured_output": structured_invoke}, out, failed)


def outlines(out: dict) -> None:
    import outlines
    from pydantic import BaseModel

    class Fruit(BaseModel):
        name: str
        color: str

    failed = None
    try:
        model = outlines.from_llamacpp(llama_cpp.Llama(MODEL, **LLAMA))
    except Exception as exc:  # noqa: BLE001
        failed = error(exc)
    greedy = dict(max_tokens=MAX_TOKENS, temperature=0)
    run({"outlines.text": lambda: model(QUESTION, **greedy),
         "outlines.regex": lambda: model("A phone number:", outlines.types.Regex(r"[0-9]{3}-[0-9]{4}"), **greedy),
         "outlines.json": lambda: model(QUESTION, Fruit, max_tokens=24, temperature=0)}, out, failed)


def guidance(out: dict) -> None:
    failed = None
    try:
        import guidance
        lm = guidance.models.LlamaCpp(llama_cpp.Llama(MODEL, **LLAMA), echo=False)
    except Exception as exc:  # noqa: BLE001
        failed = error(exc)
    run({"guidance.gen": lambda: (lm + PROMPT + guidance.gen("x", max_tokens=MAX_TOKENS, temperature=0))["x"],
         "guidance.select": lambda: (lm + "Is the sky blue? Answer: "
                                     + guidance.select(["yes", "no", "maybe"], name="y"))["y"]}, out, failed)


if __name__ == "__main__":
    results: dict = {}
    for client in CLIENTS:
        {"langchain": langchain, "outlines": outlines, "guidance": guidance}[client](results)
    print(json.dumps(results, indent=1))
