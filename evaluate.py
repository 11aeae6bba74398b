"""Accuracy of the shipped weights on the CIFAR-10 test split, through Classifier.predict (the app's own path).

    python evaluate.py                       # shipped weights, ../shared/data archive (or a download)
    python evaluate.py --weights other.pt --confusion confusion.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from charts import confusion_matrix_figure
from classifier import CLASSES, Classifier, load_classifier
from train import load_cifar10

DEFAULT_CONFUSION = Path(__file__).resolve().parent / "models" / "confusion_matrix.png"


def evaluate(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, chunk: int = 500) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows true, columns predicted) of predict() on uint8 images."""
    predicted = []
    for start in range(0, len(images), chunk):
        batch = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images[start:start + chunk]]
        predicted += [CLASSES.index(p.label) for p in classifier.predict(batch)]
    matrix = [[0] * len(CLASSES) for _ in CLASSES]
    for truth, guess in zip(labels.tolist(), predicted):
        matrix[truth][guess] += 1
    correct = sum(matrix[i][i] for i in range(len(CLASSES)))
    return {
        "accuracy": correct / len(labels),
        "per_class_accuracy": {name: matrix[i][i] / max(1, sum(matrix[i])) for i, name in enumerate(CLASSES)},
        "confusion_matrix": matrix,
        "images": len(labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights file (default: the shipped one)")
    parser.add_argument("--data", help="CIFAR-10 archive, ImageFolder train/test folder, or torchvision root")
    parser.add_argument("--confusion", type=Path, default=DEFAULT_CONFUSION, help="where the confusion-matrix PNG goes")
    args = parser.parse_args()

    classifier = load_classifier(args.weights)
    data = load_cifar10(args.data)
    started = time.time()
    result = evaluate(classifier, data["test_x"], data["test_y"])
    seconds = time.time() - started
    print(f"model {classifier.version} on {result['images']} test images: "
          f"accuracy {result['accuracy']:.2%} ({result['images'] / seconds:.0f} images/s through predict)")
    for name, accuracy in result["per_class_accuracy"].items():
        print(f"  {name:<10} {accuracy:.1%}")
    figure = confusion_matrix_figure(result["confusion_matrix"], f"CIFAR-10 test split, accuracy {result['accuracy']:.2%}")
    args.confusion.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.confusion, dpi=120)
    print(f"confusion matrix: {args.confusion}")
    print(json.dumps({"accuracy": round(result["accuracy"], 4), "source": data["source"]}))


if __name__ == "__main__":
    main()
