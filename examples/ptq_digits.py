"""Post-training quantization of a digits-trained torchvision model, end to end.

Trains (once, then cached) a float model on the bundled digits, calibrates it on a
few hundred training images, compares float and integer accuracy, and exports QDQ
ONNX whose accuracy is then measured in onnxruntime.

    python examples/ptq_digits.py                        # resnet18, int8_pow2
    python examples/ptq_digits.py --model mobilenet_v2 --scheme int8_pow2_dw
"""

from __future__ import annotations

import argparse
from pathlib import Path

import edgequant as eq
from edgequant.demo.data import digits_loader
from edgequant.demo.training import FLOAT_EPOCHS, accuracy, float_digits_model, onnx_accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision classifier (default: resnet18)")
    parser.add_argument("--scheme", default="int8_pow2", help="quantization scheme (default: int8_pow2)")
    parser.add_argument("--calib-samples", type=int, default=256, help="calibration images (default: 256)")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images (default: all 360)")
    parser.add_argument("--float-epochs", type=int, default=FLOAT_EPOCHS, help="float training epochs")
    parser.add_argument("--out", type=Path, default=Path("build/examples"), help="output folder")
    args = parser.parse_args(argv)

    model = float_digits_model(args.model, epochs=args.float_epochs)
    calib = digits_loader("train", batch_size=64, limit=args.calib_samples)
    test = digits_loader("test", batch_size=128, limit=args.limit)

    example = next(iter(calib))[0][:16]
    qmodel = eq.PTQModule(model, example_inputs=(example,), scheme=args.scheme)
    qmodel.calibrate(calib)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.model}_{args.scheme}_ptq.onnx"
    result = qmodel.export(path)
    print(result)
    print(f"float top-1        {accuracy(model, test):6.2f} %")
    print(f"integer top-1      {accuracy(qmodel, test):6.2f} %")
    print(f"onnxruntime top-1  {onnx_accuracy(path, test):6.2f} %")


if __name__ == "__main__":
    main()
