"""Fetch, verify and extract the pinned upstream llama.cpp source.

    python tools/vendor.py            # -> vendor/llama.cpp/

The archive named in vendor/llama.cpp.lock is downloaded with pip into a cache
outside the repository, checked against the locked sha256 and only its
vendor/llama.cpp tree is extracted.  A second run uses the cache and needs no
network.  Any mismatch stops with the file, the expected and the actual hash.

PYLLAMA_SSM_SDIST=PATH takes the archive from PATH instead (a file, or a folder
holding it), with no network: the pinned sdist itself, or a slim copy cut from
it by tools/device.py for a machine without network (`make device-bundle`),
which a manifest beside it (<archive>.slim.json) describes: the sha256 of the
sdist it was cut from (the pin's, or it is refused), its own sha256 (checked)
and what it leaves out.  A tree extracted from a slim copy is marked (.pyllama-
ssm-slim) and counts as the pin's only while PYLLAMA_SSM_SDIST is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "vendor" / "llama.cpp.lock"
DEST = ROOT / "vendor" / "llama.cpp"
STAMP = ".pyllama-ssm-pin"
SLIM = ".pyllama-ssm-slim"  # in a tree extracted from a slim copy: its manifest
SDIST_ENV = "PYLLAMA_SSM_SDIST"


class VendorError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("PYLLAMA_SSM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyllama-ssm")
    return Path(base)


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pin: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise VendorError(f"{path}:{n}: expected 'key = value', got {line!r}")
        pin[key.strip()] = value.strip()
    for key in ("package", "version", "filename", "sha256", "subdir", "upstream_commit"):
        if key not in pin:
            raise VendorError(f"{path}: missing '{key}'")
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise VendorError(
            f"sha256 mismatch for {path}\n  expected {expected}\n  actual   {actual}\n"
            f"The file is corrupt, truncated or not the pinned release; delete it and rerun.")


def slim_manifest(archive: Path) -> dict | None:
    """The manifest of a slim copy of the sdist (tools/device.py), None for an archive without one."""
    path = archive.with_name(archive.name + ".slim.json")
    return json.loads(path.read_text()) if path.exists() else None


def local_archive(pin: dict[str, str]) -> Path | None:
    """The archive PYLLAMA_SSM_SDIST names, verified (None when it is unset): the pinned sdist, or a
    slim copy of it whose manifest names the pin's sha256 and the copy's own."""
    given = os.environ.get(SDIST_ENV)
    if not given:
        return None
    archive = Path(given) / pin["filename"] if Path(given).is_dir() else Path(given)
    if archive.name != pin["filename"] or not archive.is_file():
        raise VendorError(f"{SDIST_ENV}={given}: expected the file {pin['filename']} (or a folder holding it)")
    slim = slim_manifest(archive)
    if slim is None:
        verify(archive, pin["sha256"])
    elif slim.get("from_sha256") != pin["sha256"]:
        raise VendorError(f"{archive}: a slim copy of another sdist (sha256 {slim.get('from_sha256')}, "
                          f"the pin is {pin['sha256']}); stage it again (make device-bundle)")
    else:
        verify(archive, slim["sha256"])
    return archive


def download(pin: dict[str, str], cache: Path) -> Path:
    """The verified archive: PYLLAMA_SSM_SDIST's, else the cache's, else from PyPI through pip."""
    local = local_archive(pin)
    if local is not None:
        return local
    archive = cache / "sdist" / pin["filename"]
    if archive.exists():
        verify(archive, pin["sha256"])
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, f"{pin['package']}=={pin['version']}"]
        print("vendor: downloading", f"{pin['package']}=={pin['version']}", "with pip", flush=True)
        # pip prepares the sdist's metadata; without build isolation that takes
        # seconds instead of installing a build backend, so try that first.
        # Run from a PEP 517 hook (pip install .), the hook's own variables must not reach
        # the pip that builds llama-cpp-python's metadata: it would look for our backend.
        env = {k: v for k, v in os.environ.items() if not k.startswith("_PYPROJECT_HOOKS_")}
        proc = subprocess.run(cmd + ["--no-build-isolation"], capture_output=True, text=True, env=env)
        got = Path(tmp) / pin["filename"]
        if not got.exists():
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise VendorError(
                f"could not download {pin['filename']} with pip (no network, or PyPI unreachable?)\n"
                f"  expected sha256 {pin['sha256']}\n  pip said:\n{tail}")
        verify(got, pin["sha256"])
        os.replace(got, archive)
    return archive


def extract(archive: Path, pin: dict[str, str], dest: Path = DEST) -> None:
    if is_extracted(pin, dest):
        return
    prefix = f"{archive.name.removesuffix('.tar.gz')}/{pin['subdir']}/"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir() or m.issym()):
                    continue
                m.name = m.name[len(prefix):]
                if m.name.split("/", 1)[0] == ".git":
                    continue  # a submodule gitfile pointing into the sdist's build repo
                members.append(m)
            if not members:
                raise VendorError(f"{archive}: no '{pin['subdir']}' tree inside the archive")
            tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VendorError(f"{archive}: cannot extract ({e}); the archive is damaged, delete it and rerun")
    (tmp / STAMP).write_text(pin["sha256"] + "\n")
    slim = slim_manifest(archive)
    if slim is not None and dest == DEST:
        (tmp / SLIM).write_text(json.dumps(slim, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def is_extracted(pin: dict[str, str], dest: Path = DEST) -> bool:
    """Whether dest holds the pin's tree already (its stamp names the pin's sha256); a slim one
    (extracted from a slim copy) only while PYLLAMA_SSM_SDIST is set."""
    if (dest / SLIM).exists() and not os.environ.get(SDIST_ENV):
        return False
    return (dest / STAMP).exists() and (dest / STAMP).read_text().strip() == pin["sha256"]


def main() -> int:
    try:
        pin = read_lock()
        if not is_extracted(pin):  # an extracted, stamped tree needs no sdist (nor network)
            extract(download(pin, cache_root()), pin)
    except VendorError as e:
        print(f"vendor: error: {e}", file=sys.stderr)
        return 1
    slim = f" (a slim copy of the sdist: {json.loads((DEST / SLIM).read_text())['bytes_dropped'] >> 20} MiB " \
        f"of its files left out, {SLIM} names them)" if (DEST / SLIM).exists() else ""
    print(f"vendor: llama.cpp {pin['upstream_commit']} ({pin['package']} {pin['version']}) in "
          f"{DEST.relative_to(ROOT)}{slim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
