"""tools/patches.py: the series applies; a broken patch is named with its file."""

from __future__ import annotations

import shutil

import pytest

import patches



def small_tree(dest, patch_dir=patches.PATCHES):
    """Only the files the series touches: enough for git apply, fast to copy."""
    for p in patches.series(patch_dir):
        for rel in patches.touched_files(p):
            src = patches.PRISTINE / rel
            if src.exists():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / rel)
    return dest


def test_series_is_listed_and_has_headers():
    listed = patches.series()
    assert listed, "patches/series must list at least one patch"
    for p in listed:
        text = p.read_text()
        assert p.name[:4].isdigit() and p.name.endswith(".patch")
        assert text.startswith("From 0000000000000000000000000000000000000000 "), "zeroed From line"
        header = text.split("\n---\n", 1)[0]
        assert len(header.splitlines()) > 6, f"{p.name}: needs a header saying what and why"


def test_series_applies_to_the_pin(tmp_path):
    touched = patches.apply_series(small_tree(tmp_path))
    assert "include/llama-ssm.h" in touched
    assert "llama_memory_report_get" in (tmp_path / "include" / "llama-ssm.h").read_text()


def test_broken_patch_is_named_with_its_failing_file(tmp_path):
    broken = tmp_path / "patches"
    shutil.copytree(patches.PATCHES, broken)
    p = broken / patches.series()[0].name
    text = p.read_text()
    # Corrupt a context line of the llama-context.cpp hunk.
    marker = " #include \"llama-sampler.h\"\n"
    assert marker in text
    p.write_text(text.replace(marker, " #include \"llama-sampler-renamed.h\"\n", 1))
    tree = small_tree(tmp_path / "tree")
    with pytest.raises(patches.PatchError) as e:
        patches.apply_series(tree, broken)
    assert p.name in str(e.value) and "src/llama-context.cpp" in str(e.value)


def test_edit_then_refresh_reproduces_the_series(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    patches.edit(tmp_path / "work")
    patches.refresh(tmp_path / "work", out)
    assert (out / "series").read_text() == (patches.PATCHES / "series").read_text()
    for p in patches.series():
        assert (out / p.name).read_bytes() == p.read_bytes(), f"{p.name} changed on refresh"


def test_pristine_fixes_apply_alone_and_come_before_what_builds_on_them(tmp_path):
    """patches/pristine: what the parity reference carries too applies to the pin by itself, and any patch
    that touches its files comes after it in the series (0011 extends the AMX kernels whose crash 0008
    fixes): the pristine build is the pin plus exactly these fixes, and ours applies the rest on top."""
    fixes = patches.pristine_fixes()
    assert [patches.topic_of(p) for p in fixes] == ["ggml-amx"]
    tree = small_tree(tmp_path)
    assert sorted(patches.apply_series(tree, patches=fixes)) == sorted(f for p in fixes for f in patches.touched_files(p))
    order = patches.series()
    for fix in fixes:
        files = set(patches.touched_files(fix))
        before = [p.name for p in order[:order.index(fix)] if files & set(patches.touched_files(p))]
        assert not before, f"{fix.name} touches files of {before}, which come before it: it must apply to the pin alone"
