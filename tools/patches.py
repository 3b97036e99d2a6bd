"""The patch series over the pinned llama.cpp.

    python tools/patches.py check  [--patch-dir DIR]  # every patch applies to the pin, in order
    python tools/patches.py apply  DIR            # apply the series to DIR (pristine copy)
    python tools/patches.py edit   [DIR]          # git work tree: upstream commit + one commit per patch
    python tools/patches.py refresh [DIR]         # regenerate patches/ from that work tree

patches/series lists the files in order; each is a `git format-patch` file
whose message says what it changes in upstream behaviour and why.  patches/pristine
names the topics of the few patches the pristine build carries too: upstream bugs
that make the reference itself crash (the AMX kernels), so parity compares like with like.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vendor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"
PRISTINE = ROOT / "vendor" / "llama.cpp"
EDIT_TREE = ROOT / "build" / "patch-work"
UPSTREAM_TAG = "upstream"


class PatchError(RuntimeError):
    pass


def series(patch_dir: Path = PATCHES) -> list[Path]:
    listed = patch_dir / "series"
    if not listed.exists():
        return []
    names = [ln.split("#", 1)[0].strip() for ln in listed.read_text().splitlines()]
    paths = [patch_dir / n for n in names if n]
    for p in paths:
        if not p.exists():
            raise PatchError(f"{listed}: lists {p.name}, which does not exist")
    return paths


def series_digest(patch_dir: Path = PATCHES, patches: list[Path] | None = None) -> str:
    h = hashlib.sha256()
    for p in series(patch_dir) if patches is None else patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def topic_of(patch: Path) -> str:
    """'ggml-amx' of 0008-ggml-amx.patch."""
    return patch.stem.split("-", 1)[1] if re.match(r"\d{4}-", patch.name) else patch.stem


def pristine_fixes(patch_dir: Path = PATCHES) -> list[Path]:
    """The patches of the series the pristine build also carries (patches/pristine lists their topics):
    each must apply to the pin alone, before any patch that touches its files."""
    listed = patch_dir / "pristine"
    if not listed.exists():
        return []
    topics = {ln.split("#", 1)[0].strip() for ln in listed.read_text().splitlines()} - {""}
    fixes = [p for p in series(patch_dir) if topic_of(p) in topics]
    missing = topics - {topic_of(p) for p in fixes}
    if missing:
        raise PatchError(f"{listed}: names {', '.join(sorted(missing))}, which patches/series does not list")
    return fixes


def have_git() -> bool:
    """Whether git applies the patches; without it (a bare build machine: the offline GPU machine of
    `make device-check`) the applier below does, which takes the same files and refuses the same way."""
    return os.environ.get("PYLLAMA_SSM_PATCH_APPLIER") != "python" and shutil.which("git") is not None


def touched_files(patch: Path) -> list[str]:
    """Paths (relative to the tree) a patch modifies, adds or deletes."""
    if not have_git():
        return [new or old for old, new, _ in _parse(patch)]
    out = subprocess.run(["git", "apply", "--numstat", str(patch)], capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise PatchError(f"{patch.name}: not a valid patch: {out.stderr.strip()}")
    return [ln.split("\t", 2)[2] for ln in out.stdout.splitlines() if ln.count("\t") >= 2]


# -- without git: a strict applier for the series' `git format-patch` files --------------------------
# Text hunks only (what the series holds: modified and new files); each hunk's old lines must be in the
# file exactly, at the line it names or shifted by an offset, as `git apply` takes them (no fuzz).

_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _parse(patch: Path) -> list[tuple[str | None, str | None, list[tuple[int, list[bytes], list[bytes]]]]]:
    """[(old path or None for a new file, new path or None for a deleted one, [(old start, old lines, new lines)])]."""
    lines = patch.read_bytes().splitlines(keepends=True)
    files: list = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(b"GIT binary patch") or line.startswith(b"rename from "):
            raise PatchError(f"{patch.name}: binary or rename hunks need git (install git)")
        if line.startswith(b"--- ") and i + 1 < len(lines) and lines[i + 1].startswith(b"+++ "):
            old, new = (ln[4:].rstrip(b"\r\n").split(b"\t")[0].decode() for ln in (line, lines[i + 1]))
            files.append([None if old == "/dev/null" else old.split("/", 1)[1],
                          None if new == "/dev/null" else new.split("/", 1)[1], []])
            i += 2
            continue
        m = _HUNK.match(line)
        if m and files:
            start, n_old, n_new = int(m[1]), int(m[2] or 1), int(m[4] or 1)
            old_lines: list[bytes] = []
            new_lines: list[bytes] = []
            i += 1
            while (len(old_lines) < n_old or len(new_lines) < n_new) and i < len(lines):
                tag, body = lines[i][:1], lines[i][1:]
                if tag in (b" ", b"\n", b"\r"):  # a context line (an empty one may have lost its space)
                    body = body if tag == b" " else lines[i]
                    old_lines.append(body)
                    new_lines.append(body)
                elif tag == b"-":
                    old_lines.append(body)
                elif tag == b"+":
                    new_lines.append(body)
                elif tag != b"\\":
                    raise PatchError(f"{patch.name}: malformed hunk at line {i + 1}")
                i += 1
                if i < len(lines) and lines[i].startswith(b"\\"):  # "\ No newline at end of file"
                    for side, present in ((old_lines, tag != b"+"), (new_lines, tag != b"-")):
                        if present and side:
                            side[-1] = side[-1].rstrip(b"\n")
                    i += 1
            files[-1][2].append((start, old_lines, new_lines))
            continue
        i += 1
    if not files:
        raise PatchError(f"{patch.name}: not a valid patch: no file in it")
    return [tuple(f) for f in files]


def _apply_python(tree: Path, patch: Path, check_only: bool) -> None:
    """Apply one patch to tree (or only check that it applies); a PatchError names the failing file."""
    results: dict[Path, bytes | None] = {}
    for old, new, hunks in _parse(patch):
        path = tree / (old or new)
        if old is None:
            if path.exists():
                raise PatchError(f"error: {new}: already exists in working directory")
            text: list[bytes] = []
        elif not path.exists():
            raise PatchError(f"error: {old}: No such file or directory")
        else:
            text = (results[path] if path in results else path.read_bytes()).splitlines(keepends=True)
        shift = 0
        for start, old_lines, new_lines in hunks:
            want = max(start - 1 + shift, 0) if old_lines else (start + shift if start else 0)
            at = next((p for d in range(len(text) + 1) for p in (want - d, want + d)
                       if 0 <= p <= len(text) - len(old_lines) and text[p:p + len(old_lines)] == old_lines), None)
            if at is None:
                raise PatchError(f"error: patch failed: {old or new}:{start}")
            text[at:at + len(old_lines)] = new_lines
            shift = at - (start - 1) + len(new_lines) - len(old_lines) if old_lines else shift + len(new_lines)
        results[tree / (new or old)] = None if new is None else b"".join(text)
    if check_only:
        return
    for path, data in results.items():
        if data is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _failing_file(stderr: str) -> str:
    m = re.search(r"patch failed: ([^:\n]+):\d+", stderr) or re.search(r"error: ([^:\n]+): ", stderr)
    return m.group(1) if m else "?"


def _apply_env(tree: Path) -> dict[str, str]:
    # git apply inside some enclosing repository would apply relative to that
    # repository's root and skip our paths; keep git from looking above tree.
    return {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.resolve().parent)}


def apply_series(tree: Path, patch_dir: Path = PATCHES, patches: list[Path] | None = None) -> list[str]:
    """Check then apply each patch of the series (or of `patches`) in order to tree; returns every touched path."""
    touched: list[str] = []
    env = _apply_env(tree)
    git = have_git()
    for p in series(patch_dir) if patches is None else patches:
        if git:
            check = subprocess.run(["git", "apply", "--check", "-p1", str(p)], cwd=tree, capture_output=True,
                                   text=True, env=env)
            failed = check.stderr.strip() if check.returncode != 0 else None
        else:
            try:
                _apply_python(tree, p, check_only=True)
                failed = None
            except PatchError as e:
                failed = str(e)
        if failed is not None:
            raise PatchError(
                f"patch {p.name} does not apply: failing file {_failing_file(failed)}\n"
                f"{failed}\n"
                f"Fix it in a work tree (`make patches-edit`, edit, commit, `make patches-refresh`).")
        if git:
            subprocess.run(["git", "apply", "-p1", str(p)], cwd=tree, check=True, env=env)
        else:
            _apply_python(tree, p, check_only=False)
        touched += touched_files(p)
    return sorted(set(touched))


def copy_pristine(dest: Path) -> None:
    if not (PRISTINE / "CMakeLists.txt").exists():
        raise PatchError(f"{PRISTINE} is missing: run `make vendor` first")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(PRISTINE, dest, symlinks=True, ignore=shutil.ignore_patterns(".git", vendor.STAMP))


def check(patch_dir: Path = PATCHES) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "llama.cpp"
        copy_pristine(tree)
        apply_series(tree, patch_dir)
    print(f"patches: {len(series(patch_dir))} patch(es) apply cleanly to the pin")


def _git(tree: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env_args = ["-c", "user.name=pyllama-ssm", "-c", "user.email=dev@pyllama-ssm.invalid",
                "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false"]
    return subprocess.run(["git", *env_args, *args], cwd=tree, check=True, text=True, **kw)


def edit(tree: Path = EDIT_TREE, patch_dir: Path = PATCHES) -> None:
    """A git work tree holding the pin as one commit and each patch as a commit on top."""
    copy_pristine(tree)
    _git(tree, "init", "-q")
    _git(tree, "add", "-A", "-f")
    _git(tree, "commit", "-q", "-m", "upstream pin")
    _git(tree, "tag", UPSTREAM_TAG)
    for p in series(patch_dir):
        _git(tree, "am", "-q", "--keep-cr", str(p))
    print(f"patches: work tree ready in {tree}; commit one change per patch, then `make patches-refresh`")


def _topic(patch: Path) -> str:
    """'topic' of a 'Subject: [PATCH] topic: what it does' line."""
    m = re.search(r"^Subject: (?:\[PATCH[^\]]*\] )?([^\n]*)", patch.read_text(), re.M)
    subject = m.group(1) if m else patch.stem
    topic = subject.split(":", 1)[0] if ":" in subject else subject
    return re.sub(r"[^a-z0-9]+", "-", topic.lower()).strip("-")[:48] or "patch"


def refresh(tree: Path = EDIT_TREE, patch_dir: Path = PATCHES) -> None:
    """Rewrite patches/ from the commits above the upstream tag of the work tree."""
    if not (tree / ".git").exists():
        raise PatchError(f"{tree} is not a patch work tree: run `make patches-edit` first")
    with tempfile.TemporaryDirectory() as tmp:
        _git(tree, "format-patch", "-q", "--zero-commit", "--no-signature", "--no-numbered",
             "--full-index", "-o", tmp, f"{UPSTREAM_TAG}..HEAD")
        new = sorted(Path(tmp).glob("*.patch"))
        for old in patch_dir.glob("[0-9][0-9][0-9][0-9]-*.patch"):
            old.unlink()
        names = []
        for n, p in enumerate(new, 1):
            name = f"{n:04d}-{_topic(p)}.patch"
            shutil.copy(p, patch_dir / name)
            names.append(name)
    (patch_dir / "series").write_text("".join(n + "\n" for n in names))
    print(f"patches: wrote {len(names)} patch(es) and patches/series")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--patch-dir", type=Path, default=PATCHES)
    a = sub.add_parser("apply")
    a.add_argument("tree", type=Path)
    e = sub.add_parser("edit")
    e.add_argument("tree", type=Path, nargs="?", default=EDIT_TREE)
    r = sub.add_parser("refresh")
    r.add_argument("tree", type=Path, nargs="?", default=EDIT_TREE)
    args = ap.parse_args()
    try:
        if args.cmd == "check":
            check(args.patch_dir)
        elif args.cmd == "apply":
            apply_series(args.tree)
        elif args.cmd == "edit":
            edit(args.tree)
        else:
            refresh(args.tree)
    except PatchError as e:
        print(f"patches: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
