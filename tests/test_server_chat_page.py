"""The chat page at `/` in a real browser (issue #29): headless Chromium driven over the DevTools Protocol.

The page is opened from a running server, a message is typed and sent, and the streamed answer is
read from the page: the same reasoning and text as the API gives for the same conversation (greedy),
with its tokens per second and the prompt tokens the prefix cache supplied (the second turn reuses
the first one's prefix).  Chromium comes from Debian (`apt-get install -y chromium`); without it the
browser test is skipped and says so.  The protocol client is the `websockets` package.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import zoo_path

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

KEY = "sk-page"
BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
               None)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--model_alias", "qwen", "--n_ctx", "2048",
                       "--n_parallel", "2", "--n_threads", "2", "--api_key", KEY, "--verbose", "false") as s:
        yield s


def test_the_page_is_served_without_the_key(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "v1/chat/completions" in page and "include_usage" in page and "cached_tokens" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing from elsewhere
    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "/" not in schema["paths"]
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still needs it


class Browser:
    """Headless Chromium and one page of it, driven over the Chrome DevTools Protocol."""

    def __init__(self, binary: str):
        from websockets.sync.client import connect

        # Chromium's helpers (renderer, crashpad) may still write to the profile as the browser exits:
        # its own process group, ended as a whole, and a leftover temporary file is not a failure
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--disable-dev-shm-usage", "--remote-debugging-port=0",
                                      f"--user-data-dir={self.profile.name}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not open its DevTools port (exit code {self.proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == n:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def screenshot(self, path: Path) -> None:
        import base64
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} stayed falsy for {timeout}s")
            time.sleep(0.1)
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the helpers too, whatever the browser did
        self.proc.wait()
        self.profile.cleanup()


@pytest.fixture
def browser():
    if BROWSER is None:
        pytest.skip("no Chromium: install it from Debian (apt-get install -y chromium) to test the chat page")
    pytest.importorskip("websockets", reason="the DevTools Protocol client (pip install websockets)")
    b = Browser(BROWSER)
    yield b
    b.close()


SEND = """(() => {
  document.getElementById("input").value = %s;
  document.getElementById("form").requestSubmit();
  return true;
})()"""
LAST = """(() => {
  const all = document.querySelectorAll(".message.assistant");
  const m = all[all.length - 1];
  if (!m || m.dataset.state === "streaming") return null;
  return {state: m.dataset.state, n: all.length, reasoning: m.querySelector(".reasoning").textContent,
          content: m.querySelector(".content").textContent, stats: m.querySelector(".stats").textContent,
          numbers: {...m.querySelector(".stats").dataset}};
})()"""


def api_answer(server, messages: list[dict]) -> tuple[str, str]:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                   json={"messages": messages, "temperature": 0, "max_tokens": 24})
    message = r.json()["choices"][0]["message"]
    return message.get("reasoning_content") or "", message.get("content") or ""


def test_a_conversation_in_the_browser(server, browser):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=server.url + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    # the key typed in; greedy and short, so that the API's own answer can be compared
    browser.js(f"""(() => {{ const k = document.getElementById("api-key"); k.value = {json.dumps(KEY)};
                   k.dispatchEvent(new Event("change"));
                   document.getElementById("temperature").value = "0";
                   document.getElementById("max-tokens").value = "24"; return true; }})()""")
    browser.wait_for("document.getElementById('model').options.length > 0")
    assert browser.js("document.getElementById('model').value") == "qwen"

    browser.js(SEND % json.dumps("Name a colour."))
    first = browser.wait_for(LAST)
    assert first["state"] == "done", first
    reasoning, content = api_answer(server, [{"role": "user", "content": "Name a colour."}])
    assert (first["reasoning"], first["content"]) == (reasoning, content)
    assert first["reasoning"] or first["content"]
    numbers = first["numbers"]
    assert int(numbers["completionTokens"]) == 24 and float(numbers["tokensPerSecond"]) > 0
    assert int(numbers["promptTokens"]) > 5 and "tokens/s" in first["stats"] and "cached" in first["stats"]

    browser.js(SEND % json.dumps("And another?"))
    second = browser.wait_for(f"(() => {{ const r = {LAST}; return r && r.n === 2 ? r : null; }})()")
    assert second["state"] == "done", second
    # the second turn's prompt starts with the first: the prefix cache supplied part of it
    assert 0 < int(second["numbers"]["cachedTokens"]) < int(second["numbers"]["promptTokens"])
    reasoning, content = api_answer(server, [{"role": "user", "content": "Name a colour."},
                                             {"role": "assistant", "content": first["content"]},
                                             {"role": "user", "content": "And another?"}])
    assert (second["reasoning"], second["content"]) == (reasoning, content)
    if os.environ.get("PYLLAMA_SSM_SCREENSHOTS"):  # a look at the page: PNGs in that directory
        browser.screenshot(Path(os.environ["PYLLAMA_SSM_SCREENSHOTS"]) / "chat_page.png")
