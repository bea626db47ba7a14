"""The scripts in examples/ run as users run them, on small inputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgequant.demo.data import digits_tensors
from edgequant.demo.training import FLOAT_EPOCHS, RECIPE
from edgequant.export.runtime import session

from .helpers import ROOT, warmed_model

LIMIT = 96


@pytest.fixture(scope="module")
def float_cache(tmp_path_factory) -> Path:
    """A float-model cache holding resnet18, so that the examples skip their float training.

    The file names are the ones `float_digits_model("resnet18", epochs)` looks for; the
    model is random-init with BN statistics from data, which is all these runs need.
    """
    cache = tmp_path_factory.mktemp("float_cache")
    model = warmed_model("resnet18", digits_tensors("train")[0])
    for epochs in (1, FLOAT_EPOCHS):  # 1 for the examples' --float-epochs, the default for train_ddp.py
        torch.save(model.state_dict(), cache / f"resnet18_digits_e{epochs}_{RECIPE}.pt")
    return cache


def run_example(script: str, *args: str, cache: Path | None = None, launcher: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "EDGEQUANT_CACHE": str(cache)} if cache else None
    proc = subprocess.run(
        [sys.executable, *launcher, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def reported(stdout: str, label: str) -> float:
    return float(re.search(rf"^{label}\s+([\d.]+) %", stdout, re.MULTILINE).group(1))


def ort_top1(path: Path, limit: int) -> float:
    """Top-1 % of the file on the first `limit` digits test images, computed here."""
    x, y = digits_tensors("test")
    sess = session(str(path))
    logits = sess.run(None, {sess.get_inputs()[0].name: x[:limit].numpy()})[0]
    return 100.0 * float((np.argmax(logits, 1) == y[:limit].numpy()).mean())


def test_ptq_example(float_cache, tmp_path):
    args = ["--float-epochs", "1", "--calib-samples", "64", "--limit", str(LIMIT), "--out", str(tmp_path)]
    stdout = run_example("ptq_digits.py", *args, cache=float_cache)
    path = tmp_path / "resnet18_int8_pow2_ptq.onnx"
    assert path.is_file() and (tmp_path / "resnet18_int8_pow2_ptq.options.json").is_file()
    assert reported(stdout, "onnxruntime top-1") == pytest.approx(ort_top1(path, LIMIT), abs=0.005)
    assert reported(stdout, "integer top-1") == reported(stdout, "onnxruntime top-1")  # int8_pow2 is bit-exact


def test_qat_example(float_cache, tmp_path):
    args = ["--float-epochs", "1", "--epochs", "1", "--limit", str(LIMIT), "--out", str(tmp_path)]
    stdout = run_example("qat_digits.py", *args, cache=float_cache)
    path = tmp_path / "resnet18_int8_pow2_qat.onnx"
    assert path.is_file() and (tmp_path / "resnet18_int8_pow2_qat.pt").is_file()
    assert "epoch 1: QAT top-1" in stdout
    assert reported(stdout, "onnxruntime top-1") == pytest.approx(ort_top1(path, LIMIT), abs=0.005)
    assert reported(stdout, "integer top-1") == reported(stdout, "onnxruntime top-1")


@pytest.mark.slow
def test_segmentation_example_exports_with_exact_parity(tmp_path):
    stdout = run_example(
        "segmentation.py", "--classes", "3", "--size", "64", "--calib-samples", "16", "--out", str(tmp_path)
    )
    path = tmp_path / "lraspp_mobilenet_v3_large_int8_pow2.onnx"
    assert "max |diff| 0 " in stdout  # int8_pow2: onnxruntime equals the integer torch model exactly
    sess = session(str(path))
    out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 3, 64, 64), np.float32)})
    assert [o.shape for o in out] == [(2, 3, 64, 64)]  # one tensor: per-pixel logits at input resolution


def test_ddp_example_on_two_gloo_ranks(float_cache, tmp_path):
    # tests/numerics/test_distributed.py checks the reductions themselves; this runs the script as users launch it.
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = ["--epochs", "1", "--backend", "gloo", "--no-progress"]
    out, checkpoint = tmp_path / "ddp.onnx", tmp_path / "ddp.pt"
    stdout = run_example(
        "train_ddp.py", *args, "--out", str(out), "--checkpoint", str(checkpoint), cache=float_cache, launcher=torchrun
    )
    assert "ranges identical on all ranks: True" in stdout
    assert "max |diff| 0 " in stdout
    assert checkpoint.is_file()
    sess = session(str(out))
    images = digits_tensors("test")[0][:LIMIT]
    assert sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0].shape == (LIMIT, 10)
