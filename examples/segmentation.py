"""PTQ of a torchvision segmentation model, exported to QDQ ONNX and checked in onnxruntime.

Runs without downloads: the model has random weights, and random images stand in for
a calibration set, so the point here is the export path, not the accuracy. With your
own trained model, load its state_dict and calibrate on a few hundred real images.

    python examples/segmentation.py                      # lraspp_mobilenet_v3_large, 64x64
    python examples/segmentation.py --model deeplabv3_mobilenet_v3_large --size 96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch import nn

import edgequant as eq


@torch.no_grad()
def settle_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Give random-init BN layers running statistics from data, as training would."""
    model.train()
    for batch in images.split(8):
        model(batch)
    model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lraspp_mobilenet_v3_large", help="torchvision segmentation model")
    parser.add_argument("--classes", type=int, default=4, help="number of segmentation classes (default: 4)")
    parser.add_argument("--size", type=int, default=64, help="square input size (default: 64)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration images (default: 32)")
    parser.add_argument("--scheme", default="int8_pow2", help="quantization scheme (default: int8_pow2)")
    parser.add_argument("--out", type=Path, default=Path("build/examples"), help="output folder")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    # weights=None and weights_backbone=None: nothing is downloaded.
    builder = torchvision.models.get_model_builder(args.model)
    model = builder(weights=None, weights_backbone=None, num_classes=args.classes)
    images = torch.rand(args.calib_samples, 3, args.size, args.size) * 2 - 1
    settle_batchnorm(model, images)

    # The model returns {"out": logits}; the exported ONNX model has that tensor as its output.
    qmodel = eq.PTQModule(model, example_inputs=(images[:4],), scheme=args.scheme)
    qmodel.calibrate(images.split(8))
    args.out.mkdir(parents=True, exist_ok=True)
    result = qmodel.export(args.out / f"{args.model}_{args.scheme}.onnx")
    print(result)


if __name__ == "__main__":
    main()
