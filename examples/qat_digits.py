"""Quantization-aware training in a plain PyTorch training loop.

The only edgequant lines are the wrapper and the export: the loop, the optimizer and
the loss are ordinary PyTorch. The float model is trained once on the bundled digits
and cached.

    python examples/qat_digits.py                        # resnet18, 3 QAT epochs
    python examples/qat_digits.py --model mobilenet_v2 --scheme int8 --epochs 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import edgequant as eq
from edgequant.demo.data import digits_loader
from edgequant.demo.training import FLOAT_EPOCHS, accuracy, float_digits_model, onnx_accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision classifier (default: resnet18)")
    parser.add_argument("--scheme", default="int8_pow2", help="quantization scheme (default: int8_pow2)")
    parser.add_argument("--epochs", type=int, default=3, help="QAT epochs (default: 3)")
    parser.add_argument("--lr", type=float, default=2e-3, help="SGD learning rate (default: 2e-3)")
    parser.add_argument("--limit", type=int, help="use the first N training and test images (default: all)")
    parser.add_argument("--float-epochs", type=int, default=FLOAT_EPOCHS, help="float training epochs")
    parser.add_argument("--out", type=Path, default=Path("build/examples"), help="output folder")
    args = parser.parse_args(argv)

    model = float_digits_model(args.model, epochs=args.float_epochs)
    train = digits_loader("train", batch_size=64, limit=args.limit)
    test = digits_loader("test", batch_size=128, limit=args.limit)
    print(f"float top-1 {accuracy(model, test):.2f} %")

    example = next(iter(train))[0][:16]
    calib = digits_loader("train", batch_size=64, limit=256, shuffle=False)  # unlabelled use: images only
    qmodel = eq.QATModule(
        model,
        example_inputs=(example,),
        scheme=args.scheme,
        config=eq.QATConfig(eq.FreezeSchedule(args.epochs)),
        calibration_data=calib,
    )
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        qmodel.train()  # each train() after some steps starts the next epoch of the freezing schedule
        for x, y in train:
            optimizer.zero_grad()
            loss_fn(qmodel(x), y).backward()
            optimizer.step()
        qmodel.eval()
        print(f"epoch {epoch + 1}: QAT top-1 {accuracy(qmodel, test):.2f} %")

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(qmodel.state_dict(), args.out / f"{args.model}_{args.scheme}_qat.pt")  # resumable checkpoint
    path = args.out / f"{args.model}_{args.scheme}_qat.onnx"
    result = qmodel.export(path)
    print(result)
    print(f"integer top-1      {accuracy(qmodel.convert(), test):6.2f} %")
    print(f"onnxruntime top-1  {onnx_accuracy(path, test):6.2f} %")


if __name__ == "__main__":
    main()
