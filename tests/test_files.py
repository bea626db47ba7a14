import os
import stat

import pytest

from edgequant import files


def test_atomic_path_replaces_the_file_with_plain_permissions(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with files.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block succeeds
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_a_failure_midway_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_destinations_that_cannot_be_written(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"directory .*nope does not exist"):
        files.check_writable(tmp_path / "nope" / "m.onnx")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        files.check_writable(tmp_path)
    # Permission bits do not bind root, so the refusal is simulated at the access check.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="is not writable"):
        files.check_writable(tmp_path / "m.onnx")
