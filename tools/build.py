"""Build libllama + ggml twice from the pinned source: pristine and patched.

    python tools/build.py [--cuda {auto,on,off}] [--jobs N]

Extra CMake options (part of the cache key) go in CMAKE_ARGS, as for
llama-cpp-python (`CMAKE_ARGS="-DGGML_CUDA=on"`; PYLLAMA_SSM_CMAKE_ARGS too).
`pip install .` builds through the same Builder (tools/pep517_backend.py), so a
wheel built after `make build` with the same options compiles nothing.

Results (shared libraries with $ORIGIN rpaths, headers, and for the pristine
build llama-server and ggml-rpc-server):

    build/upstream/{lib,include,bin}    pristine upstream (+ the fixes patches/pristine names)
    build/patched/{lib,include}         upstream + patches/series

Both builds share one CMake object tree kept in a cache outside the repository
($PYLLAMA_SSM_CACHE, default ~/.cache/pyllama-ssm), keyed by the pin and the
build options.  The pristine build runs first; the patches are then applied in
place and Ninja recompiles only the files they touch (and their dependents), so
every other object of the patched build is the upstream object.  When the
series changes, only files whose patched text changes are rewritten.  Finished
builds are kept as artifacts keyed by pin + options (+ patch series), so a
fresh clone with the same inputs copies them instead of compiling.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import patches as series_mod  # noqa: E402
import vendor  # noqa: E402

ROOT = vendor.ROOT
BUILD = ROOT / "build"
# Bump when the configuration below changes in a way the key cannot see.
CONFIG_VERSION = "2"  # 2: source paths mapped out of the binaries (-ffile-prefix-map)
LIB_TARGETS = ["llama", "ggml"]
TOOL_TARGETS = ["llama-server", "ggml-rpc-server"]
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"


class BuildError(RuntimeError):
    """A build that cannot start or did not finish; the message is one line naming the cause."""


_TRUE, _FALSE = ("on", "1", "true", "yes", "y"), ("off", "0", "false", "no", "n")


def extra_args() -> list[str]:
    """The user's CMake options: CMAKE_ARGS (llama-cpp-python's variable) and PYLLAMA_SSM_CMAKE_ARGS."""
    return [*shlex.split(os.environ.get("PYLLAMA_SSM_CMAKE_ARGS", "")), *shlex.split(os.environ.get("CMAKE_ARGS", ""))]


def split_cuda(args: list[str]) -> tuple[bool | None, list[str]]:
    """(-DGGML_CUDA=... of args as a bool, or None; the other args): CUDA is one switch, however spelt,
    so `CMAKE_ARGS=-DGGML_CUDA=on pip install .` and `make build CUDA=1` share one cache key."""
    cuda, rest = None, []
    for a in args:
        name, sep, value = a.partition("=")
        if sep and name.split(":")[0] in ("-DGGML_CUDA", "-DLLAMA_CUDA", "-DLLAMA_CUBLAS") \
                and value.lower() in _TRUE + _FALSE:
            cuda = value.lower() in _TRUE
        else:
            rest.append(a)
    return cuda, rest


def cuda_wanted(mode: str) -> bool:
    asked, _ = split_cuda(extra_args())
    if asked is not None:  # CMAKE_ARGS says it
        return asked
    if mode in ("on", "1"):
        return True
    if mode in ("off", "0"):
        return False
    # auto: both a compiler and a visible NVIDIA GPU, or the build cannot be tested.
    if not shutil.which("nvcc") or not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return probe.returncode == 0 and "GPU" in probe.stdout


def cmake_args(cuda: bool) -> list[str]:
    args = [
        "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DGGML_NATIVE=ON",
        "-DGGML_CCACHE=ON",
        "-DGGML_RPC=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../lib",
    ]
    if cuda:
        args += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"]
    # extra options, part of the key (e.g. -DGGML_CUDA_FA=OFF for a quicker CUDA check build;
    # -DGGML_NATIVE=OFF for a portable build): later -D options win in CMake
    return args + split_cuda(extra_args())[1]


def works(*cmd: str) -> bool:
    """Whether the command runs and succeeds (a tool's --version)."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def preflight(cuda: bool) -> None:
    """Every program the build runs is there, or a BuildError naming the missing one."""
    for tool, hint in (("cmake", "pip install cmake"), ("ninja", "pip install ninja")):
        if not works(tool, "--version"):
            raise BuildError(f"{tool} not found or not working ({hint})")
    # git applies patches/series; without it (a bare machine) tools/patches.py's own applier does
    for var, names in (("CC", ("cc", "gcc", "clang")), ("CXX", ("c++", "g++", "clang++"))):
        given = shlex.split(os.environ.get(var, ""))[:1]
        if not any(shutil.which(n) for n in given or names):
            raise BuildError(f"no {'C' if var == 'CC' else 'C++'} compiler found "
                             f"({var}={given[0] if given else 'unset'}; install gcc/g++ or set {var})")
    given = os.environ.get("CUDACXX")
    if cuda and not shutil.which(given or "nvcc") and (given or not Path(DEFAULT_NVCC).exists()):
        where = f"CUDACXX={given}" if given else f"not on PATH nor at {DEFAULT_NVCC}"
        raise BuildError(f"CUDA asked for (-DGGML_CUDA=on) but nvcc is not found ({where}): "
                         f"install the CUDA toolkit, or set CUDACXX to its nvcc")


def _cause(log: Path) -> str:
    """The first error line of a failed build's log (a CMake error's message is on the lines after it)."""
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):  # "CMake Error at FILE:LINE (message):", the message indented below
            words = []
            for ln in lines[i + 1:]:
                if ln.strip() and not ln.startswith(" "):
                    break
                words += ln.split()
            message = " ".join(words)
            end = re.search(r"\.(\s|$)", message)  # its first sentence
            return "CMake: " + message[:end.start() + 1 if end else 240]
        if re.search(r"\berror:", line, re.I):  # a compiler's "file:line:col: error: ..."
            return line.strip()
    failed = [ln.strip() for ln in lines if ln.startswith("FAILED:")]
    return (failed or lines or ["no output"])[-1].strip()


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class Builder:
    def __init__(self, cuda: bool, jobs: int, log: Path | None = None):
        self.cuda = cuda
        self.jobs = jobs
        self.log = log  # compiler output goes there instead of the terminal (pip), errors name it
        pin = vendor.read_lock()
        self.args = cmake_args(cuda)
        # one source and object tree for both builds; the pristine one is the pin + patches/pristine
        self.tree_key = digest(pin["sha256"], CONFIG_VERSION, *self.args, os.uname().machine)
        self.fixes = series_mod.pristine_fixes()
        self.upstream_key = digest(self.tree_key, series_mod.series_digest(patches=self.fixes)) \
            if self.fixes else self.tree_key
        self.patched_key = digest(self.upstream_key, series_mod.series_digest())
        cache = vendor.cache_root()
        self.work = cache / "work" / self.tree_key
        self.src = self.work / "src"
        self.obj = self.work / "obj"
        self.state_file = self.work / "state.json"
        self.artifacts = cache / "artifacts"

    # -- the shared work tree -------------------------------------------------
    def _state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"applied": "", "touched": []}

    def _save_state(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def _sync_pristine(self) -> None:
        """Bring the work tree to the pin + its fixes (patches/pristine), rewriting only what changes."""
        if not (self.src / "CMakeLists.txt").exists():
            series_mod.copy_pristine(self.src)
            self._save_state({"applied": "", "touched": []})
        self._bring_to(self.fixes, self.upstream_key if self.fixes else "")

    def _apply(self) -> None:
        """Bring the work tree to the pin + the series."""
        if not (self.src / "CMakeLists.txt").exists():
            self._sync_pristine()
        self._bring_to(series_mod.series(), self.patched_key)

    def _bring_to(self, patches: list[Path], key: str) -> None:
        """The work tree becomes the pin + patches (key names that state), rewriting only files whose content changes.

        The patches are applied to a staging copy of the files they touch; a file keeps its mtime (and
        Ninja its object) unless its text differs from what the tree holds, so editing one patch rebuilds
        only its files, and going from one build to the other rewrites only what their patches change.
        """
        state = self._state()
        if state["applied"] == key:
            return
        touched = {rel for p in patches for rel in series_mod.touched_files(p)}
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp) / "tree"
            for rel in touched:
                if (series_mod.PRISTINE / rel).exists():
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(series_mod.PRISTINE / rel, stage / rel)
            stage.mkdir(parents=True, exist_ok=True)
            series_mod.apply_series(stage, patches=patches)
            for rel in touched | set(state["touched"]):
                want = stage / rel if rel in touched else series_mod.PRISTINE / rel
                cur = self.src / rel
                if not want.exists():
                    cur.unlink(missing_ok=True)
                elif not cur.exists() or cur.read_bytes() != want.read_bytes():
                    # copyfile, not copy2: a fresh mtime makes Ninja rebuild the file.
                    cur.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(want, cur)
        self._save_state({"applied": key, "touched": sorted(touched)})

    def _compile(self, targets: list[str]) -> None:
        if not (self.obj / "build.ninja").exists():
            # No build-machine path in the binaries (ggml's asserts print __FILE__).  Not in the
            # key: they name the work tree, which the key already picks (CONFIG_VERSION 2 has them).
            env = dict(os.environ)
            maps = f"-ffile-prefix-map={self.src}=llama.cpp -ffile-prefix-map={self.obj}=llama.cpp"
            for var in ("CFLAGS", "CXXFLAGS"):
                env[var] = f"{env.get(var, '')} {maps}".strip()
            if self.cuda and not env.get("CUDACXX") and not shutil.which("nvcc"):
                env["CUDACXX"] = DEFAULT_NVCC  # off PATH, where the toolkit installs it (preflight)
            try:
                run(["cmake", "-S", str(self.src), "-B", str(self.obj), *self.args], log=self.log, env=env)
            except BuildError:
                (self.obj / "CMakeCache.txt").unlink(missing_ok=True)  # configure again next time
                raise
        run(["cmake", "--build", str(self.obj), "-j", str(self.jobs), "--target", *targets], log=self.log)

    def _install(self, dest: Path, key: str, tools: bool) -> None:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "lib").mkdir(parents=True)
        (tmp / "include").mkdir()
        for so in sorted((self.obj / "bin").glob("lib*.so*")):
            target = tmp / "lib" / so.name
            if so.is_symlink():
                target.symlink_to(os.readlink(so))
            else:
                shutil.copy2(so, target)
        for h in [*sorted((self.src / "include").glob("llama*.h")), *sorted((self.src / "ggml" / "include").glob("*.h"))]:
            shutil.copy2(h, tmp / "include" / h.name)
        if tools:
            (tmp / "bin").mkdir()
            for exe in TOOL_TARGETS:
                shutil.copy2(self.obj / "bin" / exe, tmp / "bin" / exe)
        (tmp / "BUILD_KEY").write_text(key + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    def _objects(self) -> dict[str, int]:
        return {str(o.relative_to(self.obj)): o.stat().st_mtime_ns for o in self.obj.rglob("*.o")}

    def _prune_artifacts(self, keep: int) -> None:
        """Keep the current patched build and the few most recent others (each is tens of MiB)."""
        others = sorted((a for a in self.artifacts.glob("patched-*") if a != self.artifact("patched")),
                        key=lambda a: a.stat().st_mtime, reverse=True)
        for old in others[keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- the two builds --------------------------------------------------------
    def plan(self) -> list[str]:
        """What build() would do, as lines; the first word of each: "cached" (an artifact copied) or
        "compile" (CMake and Ninja run)."""
        out = []
        for flavour, done in (("upstream", "BUILD_KEY"), ("patched", "RECOMPILED")):
            there = (self.artifact(flavour) / done).exists()
            out.append(f"{'cached' if there else 'compile'} {flavour}: {self.artifact(flavour)}"
                       + ("" if there else f" (object tree {self.obj}{'' if self.obj.exists() else ', empty'})"))
        return out

    def artifact(self, flavour: str) -> Path:
        key = self.upstream_key if flavour == "upstream" else self.patched_key
        return self.artifacts / f"{flavour}-{key}"

    def build_patched(self) -> Path:
        """Only the patched libraries (what `pip install .` ships): the artifact's directory.

        With no pristine build in the cache the series is applied to a fresh tree and
        compiled once; such an artifact has no RECOMPILED list, so a later `make build`
        rebuilds it after the pristine one (recompiling only what the patches touch)."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (self.artifact("patched") / "BUILD_KEY").exists():
                step(f"building patched llama.cpp ({len(series_mod.series())} patch(es)); log: {self.log}")
                self._apply()
                self._compile(LIB_TARGETS)
                self._install(self.artifact("patched"), self.patched_key, tools=False)
        self._prune_artifacts(keep=3)
        return self.artifact("patched")

    def build(self, publish_to_repo: bool = True) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (self.artifact("upstream") / "BUILD_KEY").exists():
                step("building pristine upstream")
                self._sync_pristine()
                self._compile(LIB_TARGETS + TOOL_TARGETS)
                self._install(self.artifact("upstream"), self.upstream_key, tools=True)
            if not (self.artifact("patched") / "RECOMPILED").exists():  # absent: built by pip alone
                step(f"building patched ({len(series_mod.series())} patch(es))")
                self._apply()
                before = self._objects()
                self._compile(LIB_TARGETS)
                after = self._objects()
                self._install(self.artifact("patched"), self.patched_key, tools=False)
                # What the patches cost: objects recompiled vs. reused from the pristine build.
                rebuilt = sorted(o for o, m in after.items() if before.get(o) != m)
                (self.artifact("patched") / "RECOMPILED").write_text("".join(o + "\n" for o in rebuilt))
                step(f"patched build recompiled {len(rebuilt)} of {len(after)} objects")
        self._prune_artifacts(keep=3)
        if not publish_to_repo:
            return
        for flavour in ("upstream", "patched"):
            publish(self.artifact(flavour), BUILD / flavour)
        cfg = {"cuda": self.cuda, "tree_key": self.tree_key, "upstream_key": self.upstream_key,
               "patched_key": self.patched_key, "pristine_fixes": [p.name for p in self.fixes]}
        (BUILD / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def publish(artifact: Path, dest: Path) -> None:
    key = (artifact / "BUILD_KEY").read_text()
    if (dest / "BUILD_KEY").exists() and (dest / "BUILD_KEY").read_text() == key:
        return
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(artifact, dest, symlinks=True)


def step(msg: str) -> None:
    print(f"build: {msg}", flush=True)


def run(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> None:
    t0 = time.time()
    if log is None:
        proc = subprocess.run(cmd, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        where = f"{_cause(log)} (full log: {log})" if log else f"command failed ({proc.returncode}): {' '.join(cmd)}"
        raise BuildError(where)
    step(f"{' '.join(cmd[:3])} ... done in {time.time() - t0:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", default=os.environ.get("CUDA", "auto"), help="auto (default), on/1 or off/0")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cache-only", action="store_true",
                    help="build into the cache without replacing build/ (while build/ is in use)")
    ap.add_argument("--plan", action="store_true",
                    help="build nothing: say whether each build is cached or would compile (exit 3 if one would)")
    args = ap.parse_args()
    try:
        cuda = cuda_wanted(args.cuda)
        if args.plan:
            builder = Builder(cuda, args.jobs)
            lines = builder.plan()
            step(f"{'CUDA' if cuda else 'CPU'}; CMake options: {' '.join(builder.args)}")
            for line in lines:
                step(line)
            return 3 if any(line.startswith("compile") for line in lines) else 0
        preflight(cuda)
        Builder(cuda, args.jobs).build(publish_to_repo=not args.cache_only)
    except (series_mod.PatchError, vendor.VendorError, BuildError) as e:
        print(f"build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
