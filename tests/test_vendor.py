"""tools/vendor.py: the pin is verified, damage is named, the cache works offline."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import vendor
from conftest import ROOT

PIN = vendor.read_lock()


@pytest.fixture(scope="module")
def archive():
    path = vendor.cache_root() / "sdist" / PIN["filename"]
    if not path.exists():
        pytest.skip("pinned archive not cached: run `make vendor`")
    return path


def no_network_env(monkeypatch):
    # Every pip index and link unreachable: a download must fail fast.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_lock_names_the_pin():
    assert PIN["sha256"] == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
    assert PIN["upstream_commit"] == "0c1e57098"
    assert PIN["filename"] == "llama_cpp_python-0.3.36.tar.gz"


def test_tampered_archive_names_file_and_both_hashes(archive, tmp_path):
    bad = tmp_path / PIN["filename"]
    data = bytearray(archive.read_bytes()[:4096])
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(vendor.VendorError) as e:
        vendor.verify(bad, PIN["sha256"])
    msg = str(e.value)
    assert str(bad) in msg and PIN["sha256"] in msg and vendor.sha256_of(bad) in msg


def test_truncated_archive_in_cache_is_refused(archive, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    with open(archive, "rb") as src, open(cache / "sdist" / PIN["filename"], "wb") as dst:
        dst.write(src.read(1 << 20))  # the first MiB only
    with pytest.raises(vendor.VendorError, match="sha256 mismatch"):
        vendor.download(PIN, cache)


def test_truncated_tar_cannot_be_extracted(archive, tmp_path):
    cut = tmp_path / PIN["filename"]
    cut.write_bytes(archive.read_bytes()[: 8 << 20])
    with pytest.raises(vendor.VendorError, match="cannot extract"):
        vendor.extract(cut, PIN, tmp_path / "llama.cpp")
    assert not (tmp_path / "llama.cpp").exists(), "a failed extraction must leave nothing behind"


def test_no_network_and_no_cache_says_so(tmp_path, monkeypatch):
    no_network_env(monkeypatch)
    with pytest.raises(vendor.VendorError) as e:
        vendor.download(PIN, tmp_path / "empty-cache")
    assert "could not download" in str(e.value) and PIN["sha256"] in str(e.value)


def test_second_run_works_offline_from_the_cache(archive, tmp_path, monkeypatch):
    no_network_env(monkeypatch)
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    shutil.copy(archive, cache / "sdist" / PIN["filename"])
    monkeypatch.setenv("PYLLAMA_SSM_CACHE", str(cache))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "vendor.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "0c1e57098" in out.stdout
    assert (ROOT / "vendor" / "llama.cpp" / vendor.STAMP).read_text().strip() == PIN["sha256"]
    assert not (ROOT / "vendor" / "llama.cpp" / ".git").exists()
