"""The command line: a few real subprocesses for the happy paths, error paths in-process via main(argv)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgequant.cli import main as cli
from edgequant.cli.loading import digits_data
from edgequant.cli.main import build_parser, main
from edgequant.demo import job as demo
from edgequant.demo.training import accuracy, train_epochs
from edgequant.export.runtime import session

from ..helpers import ROOT

SPEC = "tests.cli.test_main:small_cnn"


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A model from "the user's own code", small enough that every command runs in seconds."""
    torch.manual_seed(0)

    def unit(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *unit(3, 8, 2),
        *unit(8, 16, 2),
        *unit(16, 32, 2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def conv_without_bn() -> nn.Module:
    """Breaks one guideline on purpose: module "0" is a conv without BN."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def one_epoch(model: nn.Module, lr: float, path: Path) -> Path:
    """`model` trained for one epoch on the digits, its state_dict saved at `path`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    train_epochs(model, digits_data("train", batch_size=32).loader, 1, optimizer)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """small_cnn trained for one epoch on the digits (about 90% top-1), saved as a state_dict."""
    return one_epoch(small_cnn(), 0.01, tmp_path_factory.mktemp("weights") / "small_cnn.pt")


def small_lite() -> nn.Module:
    """small_cnn's kin with what TDA4VM runs badly: hardswish and a 5x5 stride-1 depthwise conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.Hardswish(),
        nn.Conv2d(16, 16, 5, 1, 2, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def lite_weights(tmp_path_factory) -> Path:
    return one_epoch(small_lite(), 0.05, tmp_path_factory.mktemp("lite") / "small_lite.pt")


@pytest.mark.slow
def test_adapt_writes_a_model_ptq_takes(lite_weights, tmp_path, capsys):
    out = tmp_path / "lite.pt"
    spec = "tests.cli.test_main:small_lite"
    args = ["adapt", spec, "--weights", str(lite_weights), "--data", "digits", "--device", "tda4vm"]
    assert main([*args, "--epochs", "1", "--batch-size", "32", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    kinds = {c["replacement"] for c in result["report"]["changes"]}
    assert kinds == {"hardswish", "depthwise-kernel"} and result["device"] == "TDA4VM"
    assert set(result["top1"]) == {"original", "adapted", "fine-tuned (1 epochs)"}
    saved = json.loads((tmp_path / "lite.adapt.json").read_text())
    assert saved["changes"] == result["report"]["changes"]
    adapted = torch.load(out, weights_only=False)
    assert isinstance(adapted, nn.Sequential) and type(adapted[2]) is nn.ReLU
    onnx_path = tmp_path / "lite.onnx"
    assert main(["ptq", str(out), "--data", "digits", "--calib-samples", "32", "-o", str(onnx_path), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["tidl_check"]["fallback"] == [] and exported["tidl_check"]["advice"] == []
    assert exported["top1"]["float"] == pytest.approx(result["top1"]["fine-tuned (1 epochs)"])
    error = fails(
        [
            "adapt",
            spec,
            "--weights",
            str(lite_weights),
            "--data",
            "digits",
            "--device",
            "TDA4VM",
            "--replacements",
            "swish",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert "unknown replacements ['swish']" in error


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory) -> Path:
    """small_cnn's random initialisation as a state_dict: enough where only the file's keys matter."""
    path = tmp_path_factory.mktemp("untrained") / "small_cnn.pt"
    torch.save(small_cnn().state_dict(), path)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgequant.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def onnx_top1(path: Path, data) -> float:
    """Top-1 % of an ONNX file in onnxruntime, computed here rather than by edgequant."""
    sess = session(str(path))
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in data.loader:
        logits = sess.run(None, {name: x.numpy()})[0]
        correct += int((np.argmax(logits, 1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total


def trained_small_cnn(weights: Path) -> nn.Module:
    model = small_cnn()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


# ---- subprocesses: one per command


@pytest.mark.slow
def test_ptq_subprocess_writes_a_model_that_scores_what_it_reports(weights, tmp_path):
    out = tmp_path / "small.onnx"
    args = ["ptq", SPEC, "--weights", str(weights), "--data", "digits", "--calib-samples", "64", "--limit", "120"]
    proc = run_cli(*args, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["onnx"] == str(out) and out.is_file()
    assert json.loads(Path(result["options"]).read_text())["tensor_bits"] == 8
    assert (result["calibration_samples"], result["evaluation_samples"]) == (64, 120)
    evaluation = digits_data("test", limit=120)
    assert result["top1"]["float"] == pytest.approx(accuracy(trained_small_cnn(weights), evaluation.loader))
    # int8_pow2 is bit-exact in onnxruntime, so the file scores exactly what the integer model scored.
    assert result["top1"]["quantized"] == pytest.approx(onnx_top1(out, evaluation))
    assert result["top1"]["quantized"] > 50


@pytest.mark.slow
def test_qat_subprocess_trains_and_exports(weights, tmp_path):
    out = tmp_path / "qat.onnx"
    args = ["qat", SPEC, "--weights", str(weights), "--data", "digits", "--epochs", "2", "--lr", "1e-3"]
    proc = run_cli(*args, "--limit", "128", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.with_name("qat.options.json").is_file()
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.strip().startswith("QAT int8_pow2"))
    reported = float(row.split()[-2])
    assert reported == pytest.approx(onnx_top1(out, digits_data("test", limit=128)), abs=0.005)
    assert any("2 epochs, SGD lr 0.001, momentum 0.9, weight decay 0.0001" in line for line in lines)


def test_demo_runs_the_demo_with_its_options(monkeypatch, capsys, tmp_path):
    # The demo itself is `make demo` (minutes of training); here: the command reaches it with the options given.
    calls = []

    def run(model_name: str, qat_epochs: int, lr: float, out_dir: Path) -> dict[str, float]:
        print("demo output")
        calls.append((model_name, qat_epochs, lr, out_dir))
        return {"float": 99.0, "onnxruntime": 98.5}

    monkeypatch.setattr("edgequant.demo.job.run", run)
    assert main(["demo", "--model", "mobilenet_v2", "--epochs", "2", "--lr", "1e-3", "--out", str(tmp_path)]) == 0
    assert calls == [("mobilenet_v2", 2, 1e-3, tmp_path)]
    assert capsys.readouterr().out == "demo output\n"
    assert main(["demo", "--json"]) == 0
    captured = capsys.readouterr()
    demo.main([])  # `make demo`: the same defaults as `edgequant demo`
    assert calls[-1] == calls[-2]
    assert json.loads(captured.out) == {"float": 99.0, "onnxruntime": 98.5}
    assert captured.err == "demo output\n"  # stdout carries only the JSON


@pytest.mark.slow
def test_check_subprocess_reports_the_guideline_findings():
    proc = run_cli("check", "tests.cli.test_main:conv_without_bn", "--input-size", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    assert [f["subject"] for f in findings if f["code"] == "conv-without-bn"] == [["0"]]
    assert "no --weights: checking the architecture" in proc.stderr


@pytest.fixture(scope="module")
def outlier_weights(weights, tmp_path_factory) -> Path:
    """The trained small_cnn with one huge weight in its last layer, on a feature that is zero on the data.

    The float model computes the same; with one int8 scale for the whole layer most of
    its other weights round to zero, so 8 bit departs from float while 16 bit does not.
    """
    model = trained_small_cnn(weights)
    fc = model[11]
    with torch.no_grad():
        features = model[:11](digits_data("train", limit=64).loader.dataset[:][0])
        quietest = int(features.mean(0).argmin())
        fc.weight[0, quietest] = 200 * fc.weight.abs().max()  # far past the two exponents PTQ may step down
    path = tmp_path_factory.mktemp("outlier") / "outlier.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_analyze_subprocess_recommends_the_layer_and_its_ptq_command_works(outlier_weights, tmp_path, capsys):
    html = tmp_path / "report.html"
    small = ["--calib-samples", "64", "--limit", "120"]
    proc = run_cli("analyze", SPEC, "--weights", str(outlier_weights), "--data", "digits", *small, "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    assert "16-bit close to float, 8-bit is not" in proc.stdout
    assert "<svg" in html.read_text()
    lines = proc.stdout.splitlines()
    suggested = lines[lines.index("to export with these layers in 16 bit:") + 1]
    words = shlex.split(suggested)
    # The layer with the outlier comes first (a near-tie on 120 samples may add another after it).
    assert words[words.index("--high-precision") + 1].split(",")[0] == "11"

    out = tmp_path / "mixed.onnx"
    assert main([*words[1:], *small, "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scheme"] == "int8_pow2+16bit" and out.is_file()
    assert abs(result["top1"]["quantized"] - result["top1"]["float"]) <= 1.0


@pytest.mark.slow
def test_analyze_json(weights, capsys):
    args = ["analyze", SPEC, "--weights", str(weights), "--data", "digits", "--calib-samples", "64", "--limit", "120"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert (report["calibration_samples"], report["eval_samples"]) == (64, 120)
    float_top1 = accuracy(trained_small_cnn(weights), digits_data("test", limit=120).loader)
    assert report["float_accuracy"] == pytest.approx(float_top1)


@pytest.mark.slow
def test_errors_in_a_subprocess_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgequant",
            "ptq",
            SPEC,
            "--weights",
            str(tmp_path / "w.pt"),
            "--data",
            "digits",
            "-o",
            "m.onnx",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == f"edgequant ptq: error: weights file {tmp_path / 'w.pt'} does not exist"


@pytest.mark.slow
def test_ptq_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("ants", "bees"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    torch.save(small_cnn(num_classes=2).state_dict(), tmp_path / "two.pt")
    args = ["ptq", SPEC, "--num-classes", "2", "--weights", str(tmp_path / "two.pt"), "--data", str(tmp_path / "data")]
    assert main([*args, "--input-size", "32", "--batch-size", "4", "-o", str(tmp_path / "m.onnx"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["calibration_samples"], result["evaluation_samples"]) == (8, 8)
    assert f"note: evaluating on {tmp_path / 'data'} itself; pass --eval-data" in captured.err
    sess = session(str(tmp_path / "m.onnx"))
    assert sess.get_inputs()[0].shape[1:] == [3, 32, 32]


@pytest.mark.slow
def test_ptq_for_a_device_then_tidl_check_of_its_file(untrained_weights, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = ["ptq", SPEC, "--weights", str(untrained_weights), "--data", "digits", "--limit", "64"]
    assert main([*args, "--calib-samples", "32", "--device", "am68a", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["scheme"], result["device"]) == ("int8", "AM68A")  # the device's default scheme
    assert result["tidl_onnx"] == str(tmp_path / "m.tidl.onnx") and result["quant_params"] is None
    # small_cnn's AdaptiveAvgPool2d(4) exports as AveragePool 2x2 on 4x4: everything runs on the accelerator
    assert result["tidl_check"]["fallback"] == [] and result["tidl_check"]["nodes"] > 0
    assert main(["tidl-check", result["tidl_onnx"], "--device", "AM62A"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("TIDL import check for AM62A: all ") and "rules checked: supported-op" in text
    assert main(["tidl-check", str(out), "--device", "AM62A", "--json"]) == 0  # the dynamic-batch file
    report = json.loads(capsys.readouterr().out)
    assert {f["rule"] for f in report["findings"]} == {"dynamic-dims"}


def test_check_with_a_device_adds_the_tidl_import_check(capsys):
    spec = "tests.cli.test_main:conv_without_bn"
    assert main(["check", spec, "--input-size", "32", "--device", "TDA4VM", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["tidl_check"]
    assert report["device"] == "TDA4VM" and "supported-op" in report["rules"]
    # AdaptiveAvgPool2d(1) exports as ReduceMean, which TIDL would run on the ARM core; the
    # TIDL model has a GlobalAveragePool instead, so every node stays on the accelerator
    assert report["findings"] == [] and report["accelerated"] == report["nodes"] > 0


def test_tidl_check_refuses_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    error = fails(["tidl-check", str(tmp_path / "notes.txt"), "--device", "AM68A"], capsys)
    assert "is not an ONNX model" in error
    error = fails(["tidl-check", str(tmp_path / "missing.onnx"), "--device", "AM68A"], capsys)
    assert "does not exist" in error
    with pytest.raises(SystemExit) as exit_info:
        main(["tidl-check", str(tmp_path / "m.onnx"), "--device", "AM99"])
    assert exit_info.value.code == 2


def test_ptq_refuses_a_scheme_the_device_cannot_run(untrained_weights, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = ["ptq", SPEC, "--weights", str(untrained_weights), "--data", "digits", "--limit", "64"]
    error = fails([*args, "--scheme", "int8", "--device", "TDA4VM", "-o", str(out)], capsys)
    assert "TDA4VM runs power-of-2, symmetric scales only" in error and "use 'int8_pow2'" in error
    assert not list(tmp_path.iterdir())


# ---- in-process: help, entry point, error paths


def test_console_script_points_at_main():
    (script,) = entry_points(group="console_scripts", name="edgequant")
    assert script.value == "edgequant.cli.main:main"


@pytest.mark.parametrize("command", ["demo", "check", "tidl-check", "analyze", "ptq", "qat"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: edgequant {command}" in text
    assert f"examples:\n  edgequant {command}" in text


def test_every_example_in_the_help_parses():
    parser = build_parser()
    for epilog in cli.EPILOGS.values():
        for line in epilog.replace("\\\n", "").splitlines():
            if line.strip().startswith("edgequant "):
                words = shlex.split(line.split(">")[0], comments=True)[1:]
                parser.parse_args(words)  # raises SystemExit on a broken example


def fails(argv: list[str], capsys) -> str:
    """Run main in-process, expect exit code 1, and return the one error line (notes may precede it)."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    *notes, error = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err, captured.err
    assert all(line.startswith("edgequant: note: ") for line in notes), captured.err
    assert error.startswith(f"edgequant {argv[0]}: error: ")
    return error


def test_missing_files(untrained_weights, tmp_path, capsys):
    out = ["-o", str(tmp_path / "m.onnx")]
    line = fails(["ptq", SPEC, "--weights", "nope.pt", "--data", "digits", *out], capsys)
    assert line == "edgequant ptq: error: weights file nope.pt does not exist"
    line = fails(["ptq", SPEC, "--weights", str(untrained_weights), "--data", str(tmp_path / "no_data"), *out], capsys)
    assert line == f"edgequant ptq: error: data folder {tmp_path / 'no_data'} does not exist"
    target = tmp_path / "no_dir" / "m.onnx"
    line = fails(["ptq", SPEC, "--weights", str(untrained_weights), "--data", "digits", "-o", str(target)], capsys)
    assert (
        line
        == f"edgequant ptq: error: cannot write {target}: directory {target.parent} does not exist; create it first"
    )


def test_unresolvable_model_specs(tmp_path, capsys):
    out = ["--data", "digits", "--weights", "w.pt", "-o", str(tmp_path / "m.onnx")]
    line = fails(["ptq", "torchvision:resnet19", *out], capsys)
    assert line.startswith("edgequant ptq: error: torchvision has no model 'resnet19'; did you mean resnet18")
    line = fails(["qat", "no_such_package.nets:build", *out], capsys)
    assert "cannot import module 'no_such_package.nets'" in line
    line = fails(["ptq", "tests.cli.test_main:no_such_factory", *out], capsys)
    assert "module 'tests.cli.test_main' has no attribute 'no_such_factory'" in line


def test_mismatched_checkpoint_lists_keys(untrained_weights, tmp_path, capsys):
    out = ["--data", "digits", "-o", str(tmp_path / "m.onnx")]
    line = fails(["ptq", "torchvision:resnet18", "--weights", str(untrained_weights), *out], capsys)
    assert "does not match the model; missing: conv1.weight, bn1.weight" in line
    assert "unexpected: 0.weight, 1.weight, 1.bias" in line
    torch.save(small_cnn(num_classes=10).state_dict(), tmp_path / "ten.pt")
    line = fails(["ptq", SPEC, "--num-classes", "4", "--weights", str(tmp_path / "ten.pt"), *out], capsys)
    assert "shape mismatch: 11.weight (checkpoint [10, 512], model [4, 512]), 11.bias" in line


def test_empty_data_folder(untrained_weights, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    args = ["analyze", SPEC, "--weights", str(untrained_weights), "--data", str(tmp_path / "data")]
    line = fails(args, capsys)
    assert line.startswith(f"edgequant analyze: error: data folder {tmp_path / 'data'} has no class folders")
    (tmp_path / "data" / "cat").mkdir()
    line = fails([*args[:-1], str(tmp_path / "data")], capsys)
    assert "has class folders (cat) but no images" in line


def test_weights_are_required_except_for_digits_with_torchvision(tmp_path, capsys, monkeypatch):
    line = fails(["ptq", SPEC, "--data", "digits", "-o", str(tmp_path / "m.onnx")], capsys)
    assert "--weights is required for `ptq`" in line

    built = []

    def cached_digits_model(name: str) -> nn.Module:
        built.append(name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli, "float_digits_model", cached_digits_model)
    assert main(["ptq", "torchvision:resnet18", "--data", "digits", "-o", str(tmp_path / "m.onnx")]) == 1
    assert built == ["resnet18"]
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note.startswith("edgequant: note: no --weights: using resnet18 trained on the digits")
    assert error == "edgequant ptq: error: stop here (RuntimeError; rerun with --debug for the traceback)"


def test_model_and_data_class_counts_must_agree(tmp_path, capsys):
    torch.save(small_cnn(num_classes=4).state_dict(), tmp_path / "four.pt")
    args = ["ptq", SPEC, "--num-classes", "4", "--weights", str(tmp_path / "four.pt"), "--data", "digits"]
    line = fails([*args, "-o", str(tmp_path / "m.onnx")], capsys)
    assert "the model predicts 4 classes but digits test split (360 images, 10 classes) has 10" in line


def test_analyze_suggests_a_ptq_command_that_parses():
    parser = build_parser()
    given = [
        "--weights",
        "my w.pt",
        "--data",
        "calib",
        "--eval-data",
        "val",
        "--input-size",
        "48",
        "--mean",
        "0.5,0.5,0.5",
    ]
    args = parser.parse_args(["analyze", SPEC, *given])
    line = cli._ptq_command(args, ["0", "11"])
    ptq = parser.parse_args(shlex.split(line)[1:])
    assert (ptq.command, ptq.model, ptq.weights, ptq.data, ptq.eval_data) == ("ptq", SPEC, "my w.pt", "calib", "val")
    assert (ptq.input_size, ptq.mean, ptq.std) == (48, (0.5, 0.5, 0.5), None)
    assert (ptq.scheme, ptq.high_precision) == ("int8_pow2", "0,11")


def test_a_model_built_for_other_inputs(capsys):
    line = fails(["check", SPEC, "--channels", "1", "--input-size", "32"], capsys)
    assert line.startswith(f"edgequant check: error: {SPEC} does not run on 1x32x32 inputs (")
    assert line.endswith("set --input-size (and --channels for `check`) to what the model was built for")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file nope\.pt"):
        main(["ptq", SPEC, "--weights", "nope.pt", "--data", "digits", "-o", str(tmp_path / "m.onnx"), "--debug"])


def test_usage_errors_exit_with_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ptq", SPEC, "--data", "digits", "--scheme", "int4", "-o", "m.onnx"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", SPEC, "--data", "digits", "--scheme", "int16"])  # analyze compares 8-bit with 16-bit
    assert exit_info.value.code == 2


def test_float_accuracy_near_chance_is_a_loud_note_naming_the_preprocessing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_top1", lambda model, data, desc: 9.4)
    assert cli._float_top1(nn.Identity(), None, 10) == 9.4
    err = capsys.readouterr().err
    assert "WARNING: the float model's top-1 is 9.4 %, near chance (10.0 % for 10 classes)" in err
    assert "--input-size, --mean, --std and --channels" in err
    monkeypatch.setattr(cli, "_top1", lambda model, data, desc: 97.0)
    cli._float_top1(nn.Identity(), None, 10)
    assert capsys.readouterr().err == ""


# ---- detection on the canvases


@pytest.fixture(scope="module")
def canvas_retinanet_weights(tmp_path_factory) -> Path:
    """An untrained canvas RetinaNet's state_dict: the command's plumbing, not its accuracy, is under test."""
    from edgequant.demo.detection import build_detector

    path = tmp_path_factory.mktemp("detector") / "retinanet.pt"
    torch.save(build_detector("retinanet").state_dict(), path)
    return path


@pytest.mark.slow
def test_ptq_of_a_canvas_detector_reports_map_and_writes_the_meta_architecture(
    canvas_retinanet_weights, tmp_path, capsys
):
    out = tmp_path / "det.onnx"
    args = ["ptq", "canvas:retinanet", "--weights", str(canvas_retinanet_weights), "--data", "canvases"]
    assert main([*args, "--limit", "16", "--calib-samples", "16", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "detection" and set(result["map"]) == {"float", "quantized"}
    assert set(result["map"]["float"]) == {"map", "map50"}
    assert result["meta_arch"] == str(tmp_path / "det.meta_arch.prototxt")
    assert "TIDL post-processing from det.meta_arch.prototxt" in result["detection_check"]
    assert '"object_detection:meta_arch_type": 5' in (tmp_path / "det.options.json").read_text()


@pytest.mark.slow
def test_analyze_of_a_canvas_detector_prints_float_16_and_8_bit_map(canvas_retinanet_weights, capsys):
    args = ["analyze", "canvas:retinanet", "--weights", str(canvas_retinanet_weights), "--data", "canvases"]
    assert main([*args, "--limit", "16", "--calib-samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "edgequant analysis of a detector: int8_pow2 vs int16_pow2" in out
    assert "int16_pow2" in out and "heads SQNR dB" in out and "verdict (mAP within 0.5 points of float)" in out


def test_detection_command_lines_that_cannot_work_say_why(canvas_retinanet_weights, tmp_path, capsys):
    weights = str(canvas_retinanet_weights)
    cases = [
        (["canvas:yolo", "--data", "canvases"], "unknown canvas detector 'yolo'; choose canvas:ssdlite"),
        (["canvas:retinanet", "--weights", weights, "--data", "digits"], "evaluates detectors on `--data canvases`"),
        (["torchvision:resnet18", "--data", "canvases"], "--weights is required for torchvision:resnet18"),
    ]
    for args, message in cases:
        assert main(["ptq", *args, "-o", str(tmp_path / "x.onnx")]) != 0
        assert message in capsys.readouterr().err
