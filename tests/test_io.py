"""Atomic writes: all or nothing, and the finished file gets the usual permissions."""

from __future__ import annotations

import os

import pytest

from sae import io


def test_atomic_write_replaces_whole_file_with_normal_mode(tmp_path):
    path = tmp_path / "out.json"
    io.write_json(path, {"a": 1})
    io.write_json(path, {"a": 2})
    assert io.read_json(path) == {"a": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    io.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
