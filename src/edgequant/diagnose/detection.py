"""Detection accuracy: COCO mAP with pycocotools' own evaluator, on torchvision's output format."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

Detections = Sequence[dict[str, torch.Tensor]]


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().double().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def mean_average_precision(
    detections: Detections, targets: Detections, image_size: tuple[int, int] | None = None
) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 in percent (COCO's definitions) of `detections` against `targets`.

    Both are lists of per-image dicts as torchvision detectors return and take them
    (boxes x1 y1 x2 y2, labels; detections also scores). An image without ground truth
    counts only through its false positives, as in COCO.
    """
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} detections for {len(targets)} images")
    labels = sorted({int(label) for t in targets for label in t["labels"]})
    height, width = image_size or (1, 1)
    gt = {
        "images": [{"id": i, "height": height, "width": width} for i in range(len(targets))],
        "categories": [{"id": label} for label in labels],
        "annotations": [],
    }
    for i, target in enumerate(targets):
        for box, label in zip(_xywh(target["boxes"]), target["labels"].tolist(), strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": label,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    results = [
        {"image_id": i, "category_id": label, "bbox": box, "score": score}
        for i, found in enumerate(detections)
        for box, label, score in zip(
            _xywh(found["boxes"]), found["labels"].tolist(), found["scores"].tolist(), strict=True
        )
        if label in labels
    ]
    if not gt["annotations"]:
        raise ValueError("the targets hold no boxes: mAP is undefined")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        found = coco.loadRes(results) if results else COCO()
        if not results:
            found.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            found.createIndex()
        evaluator = COCOeval(coco, found, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats[:2], 0.0)  # -1 marks "no detections at all"
    return {"map": 100.0 * float(stats[0]), "map50": 100.0 * float(stats[1])}
