"""Atomic writes: a failure leaves the old artefact and no temporary files behind."""
import os
import stat

import pytest

from cozyrag_lib.atomic import atomic_dir, atomic_open, atomic_write_text


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "passages.jsonl"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages.jsonl"]


def test_successful_write_replaces_and_uses_umask_mode(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_dir_swaps_whole_folder(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as d:
        (d / "w.bin").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as d:
            (d / "w.bin").write_text("v2-partial")
            raise ValueError("crash")
    assert (out / "w.bin").read_text() == "v1"
    with atomic_dir(out) as d:
        (d / "w.bin").write_text("v2")
    assert (out / "w.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
