#!/usr/bin/env bash
# The CUDA wheel as a user installs it, on a machine with an NVIDIA GPU (no PyPI needed):
#
#   bash tools/gpu_wheel_check.sh        # from the checkout; extra CMake options in CMAKE_ARGS
#
# 1. `CMAKE_ARGS="-DGGML_CUDA=on" pip install --no-build-isolation .` into a fresh venv that sees
#    this machine's packages (setuptools, cffi, cmake, ninja, numpy, pytest: nothing is downloaded
#    but the pinned sdist, taken from $PYLLAMA_SSM_CACHE/sdist when copied there);
# 2. from a directory outside the checkout: import it, check it is the installed copy and that
#    its library sees a GPU; RUNPATHs and build-machine paths of the installed files;
# 3. the tiny model zoo and tests/test_gpu.py against the installed package
#    (PYLLAMA_SSM_TEST_INSTALLED=1: the checkout off sys.path; upstream-parity tests skip, the
#    pristine build being a checkout tool).  Ends with a short summary.
set -euo pipefail
unset PYTHONPATH PYLLAMA_SSM_BUILD  # the installed package, patched build, nothing from the checkout
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyllama-ssm-gpu-wheel.XXXXXX")
LOG="$WORK/pip-install.log"
step() { echo "== $(date +%T) $*"; }

step "venv in $WORK"
"${PYTHON:-python3}" -m venv --system-site-packages "$WORK/venv"
PY="$WORK/venv/bin/python"

step "CMAKE_ARGS=\"-DGGML_CUDA=on ${CMAKE_ARGS:-}\" pip install . (log: $LOG)"
t0=$(date +%s)
if ! CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" "$PY" -m pip install -v --no-build-isolation "$ROOT" >"$LOG" 2>&1; then
    grep -E "pyllama-ssm: build failed|^ERROR|error:" "$LOG" | tail -5; exit 1
fi
t_install=$(( $(date +%s) - t0 ))

cd "$WORK"  # outside the checkout from here on
step "import from $WORK"
"$PY" - "$ROOT" <<'PYEOF'
import os, re, subprocess, sys, time
root = sys.argv[1]
t0 = time.perf_counter(); import pyllama_ssm as ps; dt = time.perf_counter() - t0
pkg = os.path.dirname(ps.__file__)
assert pkg.startswith(sys.prefix) and not any(p.startswith(root) for p in sys.path if p), (pkg, sys.path)
gpus = [ps.ffi.string(ps.lib.ggml_backend_dev_description(d)).decode()
        for d in (ps.lib.ggml_backend_dev_get(i) for i in range(ps.lib.ggml_backend_dev_count()))
        if ps.lib.ggml_backend_dev_type(d) == ps.lib.GGML_BACKEND_DEVICE_TYPE_GPU]
libs = sorted(os.listdir(os.path.join(pkg, "_lib")))
runpaths = set()
for f in [os.path.join(pkg, "_lib", n) for n in libs] + [os.path.join(pkg, n) for n in os.listdir(pkg) if n.endswith(".so")]:
    out = subprocess.run(["readelf", "-d", f], capture_output=True, text=True).stdout
    runpaths |= set(re.findall(r"R(?:UN)?PATH.*\[(.*)\]", out))
    if root.encode() in open(f, "rb").read():
        print(f"  build path inside {os.path.basename(f)}")
print(f"  {pkg}\n  import {dt * 1000:.0f} ms; GPUs: {gpus}\n  _lib: {' '.join(libs)}\n  RUNPATHs: {sorted(runpaths)}")
assert gpus, "the installed library sees no GPU"
PYEOF

step "zoo + tests/test_gpu.py against the installed package"
export PYLLAMA_SSM_TEST_INSTALLED=1
"$PY" "$ROOT/tools/vendor.py" >/dev/null  # vocab files for the zoo (an old pip builds in a copy)
"$PY" "$ROOT/tests/models/generate.py" >/dev/null
set +e
"$PY" -m pytest -q -rs -p no:cacheprovider "$ROOT/tests/test_gpu.py" 2>&1 | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
step "summary: CUDA pip install ${t_install}s; test_gpu: $(tail -1 "$WORK/pytest.log"); logs in $WORK"
exit "$rc"
