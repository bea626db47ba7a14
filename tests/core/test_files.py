import os
import stat

import pytest

from edgequant.core import files

from ..helpers import ROOT


@pytest.mark.parametrize("anonymous", [True, False])
def test_atomic_path_replaces_the_file_with_plain_permissions(tmp_path, anonymous):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with files.atomic_path(target, anonymous=anonymous) as tmp:
        assert tmp != target
        tmp.write_bytes(b"new")
        if not anonymous:
            assert tmp.parent == tmp_path
        assert target.read_bytes() == b"old"  # nothing visible until the block succeeds
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


@pytest.mark.parametrize("anonymous", [True, False])
def test_a_failure_midway_keeps_the_old_file_and_no_temporary(tmp_path, anonymous):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), files.atomic_path(target, anonymous=anonymous) as tmp:
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


@pytest.mark.parametrize("anonymous", [True, False])
def test_a_temporary_kept_under_another_name(tmp_path, anonymous):
    target, kept = tmp_path / "model.onnx", tmp_path / "model.rejected.onnx"
    target.write_bytes(b"old")
    with files.atomic_path(target, anonymous=anonymous) as tmp:
        tmp.write_bytes(b"bad")
        files.keep_as(tmp, kept)
    assert (target.read_bytes(), kept.read_bytes()) == (b"old", b"bad")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.rejected.onnx"]


# ---- kill -9 at the write: a subprocess writes once for real, then hangs half-way through a second write

_CHILD = """
import hashlib, os, sys, time
from pathlib import Path
import torch
import edgequant as eq

target = Path(sys.argv[1])
kind = sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2))
x = torch.randn(8, 3, 6, 6)
qmodel = eq.PTQModule(model, (x,)).calibrate([x], progress=False)
if kind == "report":
    from tests.diagnose.test_report import _report
    write = lambda: _report().save(target)
elif kind == "tidl":
    from edgequant.export.tidl import write_deploy_files
    onnx_path = target.with_name("q.onnx")
    qmodel.export(onnx_path)
    from edgequant.export.devices import get_device
    write = lambda: write_deploy_files(onnx_path, qmodel.scheme, get_device("TDA4VM"))
elif kind == "cache":
    os.environ["EDGEQUANT_CACHE"] = str(target.parent)
    from edgequant.demo.training import float_digits_model
    write = lambda: float_digits_model("mobilenet_v3_small", epochs=1, progress=False)
elif kind == "save":
    write = lambda: qmodel.save(target)
else:
    write = lambda: qmodel.export(target)
write()
listing = sorted(os.listdir(target.parent))
print("DONE", hashlib.sha256(target.read_bytes()).hexdigest(), ",".join(listing), flush=True)


if kind == "cache":  # the cache is written once, when missing: the killed write is a first one
    target.unlink()


def hang(path):
    with open(path, "wb") as f:
        f.write(b"half a file")
        f.flush()
    print("WRITING", flush=True)
    time.sleep(120)


if kind in ("save", "cache"):
    torch.save = lambda obj, f, *a, **k: hang(f)
elif kind == "export":
    torch.onnx.ONNXProgram.save = lambda self, destination, *a, **k: hang(destination)
else:
    Path.write_bytes = lambda self, data: hang(self)
write()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("save", "q.pt"),
        ("export", "q.onnx"),
        ("report", "report.html"),
        ("tidl", "q.tidl.onnx"),
        ("cache", "mobilenet_v3_small_digits_e1_r2.pt"),
    ],
)
def test_kill_9_during_a_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, kind, name):
    import hashlib
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    target = out / name
    root = ROOT
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(target), kind], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        done = child.stdout.readline().split()
        assert done and done[0] == "DONE", done
        digest, listing = done[1], done[2].split(",")
        assert child.stdout.readline().strip() == "WRITING"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    if kind == "cache":  # no previous file: none may appear, half-written or whole
        assert not target.exists()
        listing.remove(name)
    else:
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest  # the previous file, intact
    assert sorted(os.listdir(out)) == listing  # and nothing else: no temporary left behind
