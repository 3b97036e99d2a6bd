#!/usr/bin/env bash
# What only a machine with an NVIDIA GPU can check, in one script (README "GPU"):
#
#   make gpu-check       bash tools/gpu_check.sh           a GPU machine with network (make deps first)
#   make device-check    bash tools/gpu_check.sh --device  the offline device machine: Python packages and the
#                        pinned source from .device/ (make device-bundle stages it), restricted build, 10 minutes
#   bash tools/gpu_check.sh --device --dry-run             any machine, no GPU: the offline path with CUDA off,
#                        nothing compiled (stops where the build cache would compile), tests collected only
#
# Steps (GPU_CHECK_STEPS=a,b,...; default: all, inplace only without --device):
#   env      the machine: GPU, nvcc, Python (and its headers), build tools, cores; --device stops here
#            when a GPU, nvcc, Python.h, cmake, ninja or g++ is missing
#   deps     the bundle's wheels (.device/wheels) installed with pip --no-index into build/device/site,
#            which goes on PYTHONPATH; without a bundle, this environment's packages
#   source   vendor/llama.cpp from the bundle's slim sdist (PYLLAMA_SSM_SDIST: tools/vendor.py), or as it is
#   build    both libraries with CUDA (tools/build.py; log: build.log), the cffi bindings, stock's pieces
#   wheel    the CUDA wheel as pip builds it (the build's libraries: no compile), installed into a folder
#            and imported from outside the checkout: its library must see the GPU
#   zoo      tests/models/generate.py: the tiny zoo, and the small models GPU_CHECK_MODELS names (dry run: tiny)
#   tests    tests/test_gpu.py (at most GPU_CHECK_TESTS_MAX seconds, 300)
#   chat     bench/chat_sessions.py offloaded, per model (GPU_CHECK_MODELS, then the real-text grafts'
#            Q4_K_M where build/models holds them), while time is left: pyllama-ssm (--n_gpu_layers -1)
#            vs the pin's llama-server built with CUDA (-ngl auto: every layer), --parallel 8 with split
#            and with unified KV; 8 users, 3 turns, GPU_CHECK_CHAT_ROUNDS (3) rounds (fewer if the time left
#            holds fewer, at GPU_CHECK_ROUND_S=60 s a round), 60 s cap a run
#   inplace  bench/inplace_decode.py offloaded and on the host's CPU cores (results in bench/results)
#
# Knobs: GPU_CHECK_BUDGET seconds for the whole run (--device: 560; else none): each long step runs under
# what is left less a reserve, and a step that cannot fit is skipped; GPU_CHECK_MODELS
# (qwen35-small,nemotron_h-small); with --device: GPU_CHECK_CUDA_ARCH (90-real: H100, H200) and
# GPU_CHECK_FA (OFF: ggml's CUDA flash-attention kernels are not compiled, which halves the compile;
# llama.cpp then runs attention without them on the GPU, ours and llama-server alike); more CMake
# options in PYLLAMA_SSM_CMAKE_ARGS (part of the build key); GPU_CHECK_BUNDLE (.device).
# Output: a timestamped step log.  With $OUT set (the device tool brings back what is under it), into
# $OUT: gpu_check.log (everything), build.log, chat.log, chat_sessions_cuda.{json,md,png}, summary.json;
# else logs in build/gpu-check/ and results in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=0
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --device) DEVICE=1 ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (--device, --dry-run)" >&2; exit 2 ;;
    esac
done
BUNDLE=${GPU_CHECK_BUNDLE:-$ROOT/.device}
MODELS=${GPU_CHECK_MODELS:-qwen35-small,nemotron_h-small}
ROUNDS=${GPU_CHECK_CHAT_ROUNDS:-3}
if [ $DEVICE = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-560}; else BUDGET=${GPU_CHECK_BUDGET:-0}; fi
STEPS=${GPU_CHECK_STEPS:-env,deps,source,build,wheel,zoo,tests,chat$([ $DEVICE = 1 ] || echo ,inplace)}
if [ -n "${OUT:-}" ]; then LOGS=$OUT; RESULTS=$OUT; else LOGS=$ROOT/build/gpu-check; RESULTS=$ROOT/bench/results; fi
WORK=$ROOT/build/device
CUDA=on
[ $DRY = 1 ] && CUDA=off
if [ $DEVICE = 1 ] && [ $DRY = 0 ]; then
    # only what the check runs on: this GPU's architecture, no UI download; part of the build key
    export PYLLAMA_SSM_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${GPU_CHECK_CUDA_ARCH:-90-real} \
-DGGML_CUDA_FA=${GPU_CHECK_FA:-OFF} -DGGML_CUDA_FA_ALL_QUANTS=OFF -DLLAMA_USE_PREBUILT_UI=OFF ${PYLLAMA_SSM_CMAKE_ARGS:-}"
fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
[ $DEVICE = 1 ] && export PIP_NO_INDEX=1  # nothing to reach there; fail at once rather than retry
mkdir -p "$LOGS" "$WORK"
exec > >(tee -a "$LOGS/gpu_check.log") 2>&1
TEE=$!

T0=$(date +%s)
RESERVE=25  # seconds kept for the summary
SUMMARY=$WORK/steps.tsv
: > "$SUMMARY"
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { if [ "$BUDGET" -gt 0 ]; then echo $(( BUDGET - $(elapsed) )); else echo 999999; fi; }
say() { echo "== $(date +%T) +$(elapsed)s $*"; }
# T [MAX] CMD...: CMD under what is left of the budget (less the reserve), at most MAX seconds when given
T() {
    local s=$(( $(left) - RESERVE ))
    if [[ $1 =~ ^[0-9]+$ ]]; then [ "$1" -lt $s ] && s=$1; shift; fi
    [ $s -lt 5 ] && s=5
    timeout -k 10 -s INT "$s" "$@"
}

# -- steps -------------------------------------------------------------------------------------------

s_env() {
    echo "mode: $([ $DEVICE = 1 ] && echo device || echo gpu)$([ $DRY = 1 ] && echo ', dry run (CUDA off)'); \
budget: $([ "$BUDGET" -gt 0 ] && echo "${BUDGET}s" || echo none); steps: $STEPS"
    echo "machine: $(uname -srm); $(nproc) cores; $(free -g | awk '/^Mem/ {print $2 " GiB memory"}'); \
disk free: $(df -h . | awk 'NR == 2 {print $4}')"
    local gpu="" nvcc py_ok tool missing=()
    if command -v nvidia-smi >/dev/null; then
        gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null)
    fi
    echo "gpu: ${gpu:-none}"
    nvcc=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; })
    echo "nvcc: ${nvcc:-none} $([ -n "$nvcc" ] && "$nvcc" --version | tail -1)"
    py_ok=$($PY -c "import os, sys, sysconfig; print(sys.executable, sys.version.split()[0], 'Python.h' if \
os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')) else 'NO-Python.h')")
    echo "python: $py_ok"
    for tool in cmake ninja gcc g++ git patch ccache; do
        printf '%s ' "$tool=$(command -v $tool >/dev/null && echo yes || echo no)"
    done
    echo "(without git, tools/patches.py applies the patches itself)"
    echo "git tree: $(git rev-parse --short HEAD 2>/dev/null || echo 'none (no .git here)'); \
PYLLAMA_SSM_CMAKE_ARGS: ${PYLLAMA_SSM_CMAKE_ARGS:-none}"
    if [ $DEVICE = 1 ] && [ $DRY = 0 ]; then
        [ -n "$gpu" ] || missing+=("an NVIDIA GPU (nvidia-smi)")
        [ -n "$nvcc" ] || missing+=("nvcc")
        [[ $py_ok == *NO-Python.h* ]] && missing+=("Python.h for $PY (cffi compiles the bindings)")
        for tool in cmake ninja g++; do command -v $tool >/dev/null || missing+=("$tool"); done
        if [ ${#missing[@]} -gt 0 ]; then echo "missing: ${missing[*]}"; return 1; fi
    fi
}

s_deps() {
    if [ ! -d "$BUNDLE/wheels" ]; then
        if [ $DEVICE = 1 ]; then
            echo "no $BUNDLE/wheels: run \`make device-bundle\` where there is network and carry .device"; return 1
        fi
        echo "no bundle: this environment's packages (make gpu-check installs them with make deps)"; return 0
    fi
    $PY tools/device.py verify --dest "$BUNDLE" || return 1
    local site=$WORK/site have want
    have=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    want=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"])' "$BUNDLE/MANIFEST.json")
    local extra=()
    if [ "$have" != "$want" ]; then
        [ $DRY = 1 ] || { echo "the bundle's wheels are for Python $want; $PY is $have"; return 1; }
        extra=(--python-version "$want" --implementation cp --only-binary=:all:
               --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    fi
    rm -rf "$site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${extra[@]}" \
        "$BUNDLE"/wheels/*.whl || return 1
    echo "installed $(ls "$BUNDLE"/wheels/*.whl | wc -l) wheels into $site with pip --no-index"
    if [ "$have" != "$want" ]; then
        echo "dry run: this Python is $have, the wheels are for $want: not put on its path"; return 0
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    $PY - "$site" <<'EOF'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
import cffi, diskcache, fastapi, httpx, jinja2, matplotlib, numpy, pydantic, pytest, sse_starlette, starlette, uvicorn  # noqa
print("imports:", ", ".join(f"{n} {md.version(n)}" for n in ("cffi", "fastapi", "starlette", "uvicorn", "pydantic",
      "anyio", "numpy", "jinja2", "httpx", "pytest", "typing_extensions")))
for dist in md.distributions(path=[sys.argv[1]]):  # the wheels' requirements against what this Python sees
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                print(f"warning: {dist.metadata['Name']} requires {req}, this Python has {have or 'none'}")
EOF
}

s_source() {
    if [ -f "$BUNDLE/sdist/$(sed -n 's/^filename *= *//p' vendor/llama.cpp.lock)" ]; then
        export PYLLAMA_SSM_SDIST=$BUNDLE/sdist
        echo "PYLLAMA_SSM_SDIST=$PYLLAMA_SSM_SDIST"
    elif [ $DEVICE = 1 ]; then
        echo "no pinned sdist in $BUNDLE/sdist: run \`make device-bundle\`"; return 1
    fi
    $PY tools/vendor.py
}

s_build() {
    $PY tools/build.py --cuda $CUDA --plan
    local rc=$?
    if [ $rc = 3 ] && [ $DRY = 1 ]; then echo "dry run: the build above would compile: stopped"; return 1; fi
    [ $rc = 0 ] || [ $rc = 3 ] || return 1
    say "build (log: $LOGS/build.log)"
    T $PY tools/build.py --cuda $CUDA > "$LOGS/build.log" 2>&1
    rc=$?
    grep '^build:' "$LOGS/build.log"
    if [ $rc != 0 ]; then tail -25 "$LOGS/build.log"; [ $rc = 124 ] && echo "build: out of time"; return 1; fi
    $PY tools/build_ffi.py && $PY tools/stock.py
}

s_wheel() {
    local w=$WORK/wheel
    rm -rf "$w"
    mkdir -p "$w"
    echo "CMAKE_ARGS=-DGGML_CUDA=$CUDA pip wheel --no-build-isolation --no-index . (the build's key: no compile)"
    if ! CMAKE_ARGS="-DGGML_CUDA=$CUDA" T 300 $PY -m pip wheel -q --no-deps --no-build-isolation --no-index \
            -w "$w/dist" . >> "$LOGS/build.log" 2>&1; then
        grep -E "pyllama-ssm: build failed|^ERROR|error:" "$LOGS/build.log" | tail -5
        return 1
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$w/site" "$w"/dist/*.whl || return 1
    (cd "${TMPDIR:-/tmp}" && PYTHONPATH="$w/site${PYTHONPATH:+:$PYTHONPATH}" $PY - "$w" "$CUDA" <<'EOF'
import os, sys
where, cuda = sys.argv[1], sys.argv[2] == "on"
import pyllama_ssm as ps
assert ps.__file__.startswith(where + "/site/"), ps.__file__
gpus = [ps.ffi.string(ps.lib.ggml_backend_dev_description(d)).decode()
        for d in (ps.lib.ggml_backend_dev_get(i) for i in range(ps.lib.ggml_backend_dev_count()))
        if ps.lib.ggml_backend_dev_type(d) == ps.lib.GGML_BACKEND_DEVICE_TYPE_GPU]
wheel = os.listdir(os.path.join(where, "dist"))[0]
libs = sorted(os.listdir(os.path.join(os.path.dirname(ps.__file__), "_lib")))
print(f"{wheel} ({os.path.getsize(os.path.join(where, 'dist', wheel)) >> 20} MiB): imported from outside the checkout;"
      f" GPUs: {gpus}; _lib: {' '.join(libs)}")
assert gpus or not cuda, "the wheel's library sees no GPU"
EOF
    )
}

s_zoo() {
    local small
    small=$(echo "$MODELS" | tr ',' '\n' | sed -n 's/-small$//p' | paste -sd, -)
    T 240 $PY tests/models/generate.py || return 1
    if [ $DRY = 1 ]; then echo "dry run: the small models ($small) not generated"; return 0; fi
    [ -z "$small" ] || T 240 $PY tests/models/generate.py --size small --arch "$small"
}

s_tests() {
    if [ $DRY = 1 ]; then
        $PY -m pytest -q -p no:cacheprovider --collect-only tests/test_gpu.py | tail -2
        return "${PIPESTATUS[0]}"
    fi
    T "${GPU_CHECK_TESTS_MAX:-300}" $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
}

CHAT_SERVERS=pyllama-ssm,llama-server,llama-server-unified
s_chat() {
    local models=() m f last=0 t0 rc status=0
    IFS=, read -r -a models <<< "$MODELS"
    for f in build/models/*-graft-q4_k_m.gguf; do [ -f "$f" ] && models+=("$(basename "$f" .gguf)"); done
    # as many rounds as fit for the first model (a round: three server runs, ~20 s each offloaded; to be
    # measured), the same for every model (--merge joins only runs of one workload); none left: skipped
    local rounds=$ROUNDS fit=$(( ($(left) - RESERVE) / ${GPU_CHECK_ROUND_S:-60} ))
    [ $fit -lt $rounds ] && rounds=$(( fit > 1 ? fit : 1 ))
    [ $rounds != "$ROUNDS" ] && say "chat: $rounds round(s), not $ROUNDS: $(( $(left) - RESERVE ))s left"
    local args=(--users 8 --turns 3 --rounds "$rounds" --servers "$CHAT_SERVERS" --time-cap 60
                --ours-args "--n_gpu_layers -1" --out chat_sessions_cuda --results-dir "$RESULTS")
    if [ $DRY = 1 ]; then
        echo "dry run: would run, per model of ${models[*]}: bench/chat_sessions.py --models M ${args[*]} [--merge]"
        (cd "$ROOT" && $PY -c "import bench.chat_sessions") && echo "bench/chat_sessions.py imports"
        return
    fi
    local first=1
    for m in "${models[@]}"; do
        # the first model needs a minute or more; a later one as long as the one before took
        if [ $(( $(left) - RESERVE )) -lt $(( last > 0 ? last + 15 : 60 )) ]; then
            say "chat: $m skipped: $(( $(left) - RESERVE ))s left, a model took ${last}s"
            continue
        fi
        say "chat: $m (log: $LOGS/chat.log)"
        t0=$(date +%s)
        T $PY bench/chat_sessions.py --models "$m" "${args[@]}" $([ $first = 0 ] && echo --merge) >> "$LOGS/chat.log" 2>&1
        rc=$?
        last=$(( $(date +%s) - t0 ))
        tr '\r' '\n' < "$LOGS/chat.log" | grep -v '^\[#*-*\]' | tail -n 30
        if [ $rc = 0 ]; then first=0; else say "chat: $m failed (exit $rc) after ${last}s"; status=1; fi
    done
    return $status
}

s_inplace() {
    local n=${GPU_CHECK_MODELS:-qwen35-small,nemotron_h-small}
    $PY bench/inplace_decode.py --models "$n" --seqs 1,8,16 --rounds 2 --weights f16 --n-gpu-layers 999 --tag cuda --no-profile \
        && $PY bench/inplace_decode.py --models "$n" --seqs 1,8,16 --rounds 2 --weights f16,q4_0 --tag cpu  # issue #8
}

# -- run ---------------------------------------------------------------------------------------------

FAILED=0
STOP=0
for name in env deps source build wheel zoo tests chat inplace; do
    [[ ",$STEPS," == *",$name,"* ]] || continue
    if [ $STOP = 1 ]; then printf '%s\tnot run\t0\n' "$name" >> "$SUMMARY"; continue; fi
    if [ $DRY = 1 ] && [ $name = inplace ]; then
        say "$name: skipped (dry run)"; printf '%s\tskipped\t0\n' "$name" >> "$SUMMARY"; continue
    fi
    if [ "$(left)" -le $RESERVE ]; then
        say "$name: skipped (out of time)"; printf '%s\tno time\t0\n' "$name" >> "$SUMMARY"; continue
    fi
    say "$name"
    started=$(date +%s)
    "s_$name"
    rc=$?
    secs=$(( $(date +%s) - started ))
    if [ $rc = 0 ]; then status=ok; else status="failed ($rc)"; FAILED=1; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$SUMMARY"
    say "$name: $status in ${secs}s"
    # nothing after these can run without them; the tests' and the benchmarks' failures are reported
    if [ $rc != 0 ] && [[ $name =~ ^(env|deps|source|build|zoo)$ ]]; then STOP=1; fi
done

say "summary"
$PY - "$SUMMARY" "$LOGS/summary.json" "$BUDGET" "$(elapsed)" "$([ $DEVICE = 1 ] && echo device || echo gpu)" \
    "$DRY" "${PYLLAMA_SSM_CMAKE_ARGS:-}" <<'EOF'
import json, subprocess, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if __import__("shutil").which("nvidia-smi") else ""
out = {"mode": sys.argv[5], "dry_run": sys.argv[6] == "1", "gpu": gpu or None, "budget_s": int(sys.argv[3]),
       "elapsed_s": int(sys.argv[4]), "cmake_args": sys.argv[7],
       "steps": [{"step": n, "status": s, "seconds": int(t)} for n, s, t in rows]}
open(sys.argv[2], "w").write(json.dumps(out, indent=1) + "\n")
for r in out["steps"]:
    print(f"  {r['step']:<8} {r['status']:<12} {r['seconds']:>4}s")
print(f"  {'total':<8} {'':<12} {out['elapsed_s']:>4}s of {out['budget_s'] or 'no'} budget; GPU: {out['gpu']}")
EOF
exec >&- 2>&-
wait $TEE 2>/dev/null  # the log complete before the caller reads it
exit $FAILED
