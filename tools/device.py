"""The bundle `make device-check` runs from on an NVIDIA machine without network: staged into .device/.

    python tools/device.py bundle [--dest .device]   # here, with network (make device-bundle)
    python tools/device.py verify [--dest .device]   # every file against the bundle's manifest, offline

The device machine (README "GPU") receives the git working tree and a few ignored
paths named in the call; it reaches no package index.  What it needs beyond the
tree and its image (nvcc, cmake, ninja, a Python 3.12 with numpy, jinja2, httpx,
pytest, matplotlib, ...) travels in .device/ (ignored by git, named in `carry`):

    .device/sdist/llama_cpp_python-0.3.36.tar.gz   a slim copy of the pinned sdist: what tools/vendor.py,
                                                   tools/build.py and tools/stock.py read (llama.cpp's sources
                                                   for libllama, ggml with CUDA, llama-server and the RPC
                                                   server; the zoo's vocabularies and chat templates; stock
                                                   llama-cpp-python's Python package, its tests and examples/
                                                   server), with <name>.slim.json: the pin's sha256, its own,
                                                   what it leaves out (PYLLAMA_SSM_SDIST, tools/vendor.py)
    .device/wheels/*.whl                           the Python packages the image lacks, for CPython 3.12 on
                                                   manylinux x86-64, pinned to the versions used here
                                                   (installed there with pip --no-index --no-deps --target)
    .device/MANIFEST.json                          every file's size and sha256, the versions, the commit

`bundle` checks that each wheel's requirements are met by another wheel or by a
package of the image (KINDS.md's list, IMAGE_PACKAGES below), and prints the size.
"""

from __future__ import annotations

import argparse
import email.parser
import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vendor  # noqa: E402

ROOT = vendor.ROOT
DEST = ROOT / ".device"
LIMIT = 55 << 20  # the device call carries at most 64 MiB with the working tree (~3.5 MiB)

# The Python packages the device run needs that the device image ('cuda', /opt/torch/.venv, Python 3.12.3)
# lacks, at the versions this project uses: cffi (the bindings: tools/build_ffi.py), the server
# (FastAPI, uvicorn, sse-starlette, pydantic) for bench/chat_sessions.py, diskcache (a dependency of
# the package), opentelemetry-api (FastAPI 0.165 requires it); typing-extensions and anyio travel for
# their versions (pydantic 2.13 needs typing-extensions >= 4.14.1, sse-starlette 3.7 anyio >= 4.7; the
# image's are not known here, and gpu_check.sh checks every requirement's version there).
WHEELS = ["cffi==2.0.0", "pycparser==3.0",
          "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.55.0", "sse-starlette==3.7.1",
          "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0", "typing-inspection==0.4.2",
          "typing-extensions==4.16.0", "anyio==4.16.0", "diskcache==5.6.3", "opentelemetry-api==1.45.3"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PYTHON = "3.12"

# /work/.library/device/KINDS.md "Python packages already there" (image 'cuda', read on 2026-11-17)
IMAGE_PACKAGES = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())

# -- the slim sdist ---------------------------------------------------------------------------------
# Kept from the sdist: stock's Python package, its license, tests and batched example server (tools/stock.py),
# and llama.cpp less what neither the build (LLAMA_BUILD_TESTS/EXAMPLES off; CPU and CUDA backends only) nor
# the zoo (tests/models/generate.py: a few vocabularies, the chat templates) reads.
SDIST_KEEP = ("llama_cpp/", "LICENSE.md", "tests/", "examples/server/", "vendor/llama.cpp/")
LLAMA_DROP = ("docs/", "media/", "tests/", "benches/", "examples/", "pocs/", ".github/", ".devops/", "ci/",
              "skills/", "tools/ui/tests/", "tools/server/tests/", "tools/server/bench/",
              *(f"ggml/src/ggml-{b}/" for b in ("vulkan", "opencl", "sycl", "hexagon", "metal", "et", "webgpu",
                                               "openvino", "cann", "virtgpu", "musa", "hip", "zdnn", "zendnn")))
ZOO_GENERATOR = ROOT / "tests" / "models" / "generate.py"


def zoo_vocabularies() -> set[str]:
    """The vocabularies tests/models/generate.py copies (its ARCHS table: tiny and small)."""
    found = re.findall(r'Arch\("[^"]+",\s*\w+,\s*\w+,\s*"([^"]+)",\s*"([^"]+)"', ZOO_GENERATOR.read_text())
    if not found:
        raise SystemExit(f"device: no Arch(...) table in {ZOO_GENERATOR} (its layout changed?)")
    return {v for pair in found for v in pair}


def keep(rel: str, vocabs: set[str]) -> bool:
    """Whether a path of the sdist (without its top folder) goes into the slim copy."""
    if not rel.startswith(SDIST_KEEP) and rel != "LICENSE.md":
        return False
    if not rel.startswith("vendor/llama.cpp/"):
        return True
    sub = rel[len("vendor/llama.cpp/"):]
    if sub.startswith(LLAMA_DROP) or sub.split("/", 1)[0] == ".git":
        return False
    if sub.startswith("models/"):
        name = sub[len("models/"):]
        return name.startswith("templates/") or name in {f"ggml-vocab-{v}.gguf" for v in vocabs}
    return True


def slim_sdist(archive: Path, pin: dict[str, str], out: Path) -> dict:
    """Write the slim copy of the verified sdist to out (same name, same top folder) and its manifest."""
    vocabs = zoo_vocabularies()
    top = archive.name.removesuffix(".tar.gz") + "/"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    kept = dropped = 0
    with tarfile.open(archive, "r:gz") as src, open(tmp, "wb") as raw:
        # gzip without a timestamp, members in the sdist's order: the same sdist gives the same bytes
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as dst:
            for m in src.getmembers():  # files and links; tar makes their folders on extraction
                rel = m.name[len(top):] if m.name.startswith(top) else None
                if m.isdir() or rel is None or not keep(rel, vocabs):
                    dropped += m.size
                    continue
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
                kept += m.size
    meta = {"from": pin["filename"], "from_sha256": pin["sha256"], "sha256": vendor.sha256_of(tmp),
            "bytes_kept": kept, "bytes_dropped": dropped,
            "dropped": ["the sdist's .git, docs and build files",
                        *(f"vendor/llama.cpp/{d}" for d in LLAMA_DROP),
                        "vendor/llama.cpp/models/ but ggml-vocab-{" + ",".join(sorted(vocabs)) + "}.gguf and templates/"]}
    tmp.replace(out)
    out.with_name(out.name + ".slim.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# -- wheels -------------------------------------------------------------------------------------------

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(dest: Path) -> list[Path]:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)),
           "-d", str(dest), *WHEELS]
    print("device: pip download", " ".join(WHEELS), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"device: pip download failed:\n{proc.stdout}{proc.stderr}")
    return sorted(dest.glob("*.whl"))


def wheel_requirements(wheel: Path) -> tuple[str, list[str]]:
    """(the distribution's name, the names it requires outside extras, for Python 3.12 on Linux)."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    needs = []
    for req in meta.get_all("Requires-Dist") or []:
        name, _, marker = req.partition(";")
        if marker.strip() and not _marker_holds(marker):  # extras' requirements among them
            continue
        needs.append(norm(re.split(r"[\s<>=!~\[(]", name.strip(), 1)[0]))
    return norm(meta["Name"]), needs


def _marker_holds(marker: str) -> bool:
    """Whether a Requires-Dist marker holds for CPython 3.12 on Linux x86-64."""
    try:
        from packaging.markers import Marker
    except ImportError:  # pip's own copy
        from pip._vendor.packaging.markers import Marker
    return Marker(marker.strip()).evaluate({"python_version": PYTHON, "python_full_version": PYTHON + ".3",
                                            "sys_platform": "linux", "platform_system": "Linux",
                                            "platform_machine": "x86_64", "os_name": "posix",
                                            "platform_python_implementation": "CPython",
                                            "implementation_name": "cpython", "extra": ""})


def check_requirements(wheels: list[Path]) -> list[str]:
    """The requirements neither a wheel of the bundle nor the image provides (empty: all met)."""
    have = {norm(p) for p in IMAGE_PACKAGES}
    reqs = {}
    for w in wheels:
        name, needs = wheel_requirements(w)
        have.add(name)
        reqs[name] = needs
    return sorted(f"{name} needs {need}" for name, needs in reqs.items() for need in needs if need not in have)


# -- the bundle -----------------------------------------------------------------------------------------

def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() if proc.returncode == 0 else None


def files_of(dest: Path) -> dict[str, dict]:
    return {str(p.relative_to(dest)): {"bytes": p.stat().st_size, "sha256": vendor.sha256_of(p)}
            for p in sorted(dest.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"}


def bundle(dest: Path) -> int:
    t0 = time.time()
    pin = vendor.read_lock()
    archive = vendor.download(pin, vendor.cache_root())  # the verified full sdist (cache, else PyPI)
    if vendor.slim_manifest(archive) is not None:
        raise SystemExit(f"device: {archive} is itself a slim copy: unset {vendor.SDIST_ENV}")
    dest.mkdir(parents=True, exist_ok=True)
    meta = slim_sdist(archive, pin, dest / "sdist" / pin["filename"])
    print(f"device: slim sdist {meta['bytes_kept'] / 2**20:.1f} MiB of files kept, "
          f"{meta['bytes_dropped'] / 2**20:.1f} MiB left out", flush=True)
    wheels = download_wheels(dest / "wheels")
    missing = check_requirements(wheels)
    if missing:
        raise SystemExit("device: requirements neither the bundle nor the image provides: " + "; ".join(missing))
    files = files_of(dest)
    manifest = {"made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
                "pin": pin, "python": PYTHON, "platforms": PLATFORMS, "wheels": WHEELS, "files": files}
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f["bytes"] for f in files.values())
    for name, f in files.items():
        print(f"  {f['bytes'] / 2**20:7.2f} MiB  {name}")
    print(f"device: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}: {len(files)} files, "
          f"{total / 2**20:.1f} MiB (limit {LIMIT >> 20} MiB with the ~4 MiB working tree under 64), "
          f"every wheel's requirements met by the bundle or the image; {time.time() - t0:.0f}s")
    if total > LIMIT:
        raise SystemExit(f"device: the bundle is {total / 2**20:.1f} MiB, over {LIMIT >> 20} MiB")
    return 0


def verify(dest: Path) -> int:
    manifest_path = dest / "MANIFEST.json"
    if not manifest_path.exists():
        print(f"device: no bundle in {dest} (make device-bundle, on a machine with network)", file=sys.stderr)
        return 1
    manifest = json.loads(manifest_path.read_text())
    bad = [name for name, f in manifest["files"].items()
           if not (dest / name).is_file() or vendor.sha256_of(dest / name) != f["sha256"]]
    extra = sorted(set(files_of(dest)) - set(manifest["files"]))
    pin = vendor.read_lock()
    if manifest["pin"]["sha256"] != pin["sha256"]:
        bad.append(f"the pin (bundle: {manifest['pin']['filename']}, lock: {pin['filename']})")
    if bad or extra:
        print(f"device: bundle {dest} differs from its manifest: {', '.join(bad + extra)}", file=sys.stderr)
        return 1
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"device: bundle {dest}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB, as staged "
          f"{manifest['made']} at commit {(manifest['commit'] or '?')[:12]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("bundle", "verify"))
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args()
    try:
        return bundle(args.dest.resolve()) if args.cmd == "bundle" else verify(args.dest.resolve())
    except vendor.VendorError as e:
        print(f"device: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
