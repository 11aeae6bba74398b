"""ResNet-18 inference for CIFAR-10: the model, its preprocessing and batched prediction.

Run as a script to classify files from the command line:

    python classifier.py photo1.jpg photo2.png
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from PIL import Image
from torch import nn

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
INPUT_SIZE = 32
# Per-channel statistics of the CIFAR-10 training images.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "models" / "resnet18_cifar10.pt"
# Big enough for a fast forward pass, small enough to bound memory on huge batches.
CHUNK_SIZE = 64


class WeightsError(RuntimeError):
    """The weights file is missing or unusable; the message says which file and what to do."""


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    probabilities: list[float]


def build_model() -> nn.Module:
    """The CIFAR variant of ResNet-18: a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep detail."""
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def bf16_supported(device: torch.device = torch.device("cpu")) -> bool:
    """bf16 autocast is a speed-up on CUDA GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX), not elsewhere."""
    if device.type == "cuda":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def to_uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """Resize any RGB images to the model's 32x32 input, anti-aliased, as an (N, 3, 32, 32) uint8 tensor."""
    arrays = []
    for image in images:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (INPUT_SIZE, INPUT_SIZE):
            # reducing_gap lets Pillow shrink by whole factors first: fast and still anti-aliased.
            image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
        arrays.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8))
    if not arrays:
        return torch.empty((0, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
    return torch.stack(arrays).view(-1, INPUT_SIZE, INPUT_SIZE, 3).permute(0, 3, 1, 2)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to the normalised float input used in training, evaluation and the app."""
    mean = torch.tensor(MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=batch.device).view(1, 3, 1, 1) * 255
    return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def file_sha256(path: Path) -> str:
    """Hash in 1 MB blocks: the weights (22 MB) and the data archive never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Classifier:
    """One loaded model shared by every Streamlit session; a lock keeps concurrent calls from fighting for the cores."""

    def __init__(self, model: nn.Module, version: str, use_bf16: bool | None = None,
                 test_accuracy: float | None = None) -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.device = next(model.parameters()).device
        self.version = version
        self.test_accuracy = test_accuracy
        self.use_bf16 = bf16_supported(self.device) if use_bf16 is None else use_bf16
        self._lock = threading.Lock()

    def probabilities(self, batch: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Class probabilities (on the CPU) for a uint8 batch, averaged over the image and its mirror when tta is on."""
        outputs = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(batch), CHUNK_SIZE):
                x = normalize(batch[start:start + CHUNK_SIZE].to(self.device))
                if tta:
                    x = torch.cat([x, x.flip(3)])
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                    logits = self.model(x)
                probs = logits.float().softmax(dim=1)
                if tta:
                    probs = probs.view(2, -1, len(CLASSES)).mean(dim=0)
                outputs.append(probs.cpu())
        if not outputs:
            return torch.empty((0, len(CLASSES)))
        return torch.cat(outputs)

    def predict(self, images: Sequence[Image.Image], top_k: int = 3) -> list[Prediction]:
        probs = self.probabilities(to_uint8_batch(images))
        predictions = []
        for row in probs.tolist():
            ranked = sorted(zip(CLASSES, row), key=lambda pair: pair[1], reverse=True)
            predictions.append(Prediction(
                label=ranked[0][0],
                confidence=ranked[0][1],
                top_k=ranked[:top_k],
                probabilities=row,
            ))
        return predictions


def load_classifier(weights_path: str | Path | None = None) -> Classifier:
    """Load the shipped weights (or another file); the version is the file's hash, so saved rows say which model spoke."""
    path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    hint = "Train a model with `python train.py` or restore the file from git."
    if not path.is_file():
        raise WeightsError(f"Model weights not found at {path}. {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model()
        model.load_state_dict({key: value.float() for key, value in state.items()})
    except Exception as error:
        raise WeightsError(f"Model weights at {path} could not be loaded ({error}). {hint}") from error
    card = path.with_suffix(".json")
    test_accuracy = json.loads(card.read_text()).get("test_accuracy_tta") if card.is_file() else None
    return Classifier(model, version=f"{path.stem}@{file_sha256(path)[:12]}", test_accuracy=test_accuracy)


def main(paths: Sequence[str]) -> int:
    from inputs import InvalidImageError, load_image

    if not paths:
        print("usage: python classifier.py PHOTO...", file=sys.stderr)
        return 2
    classifier = load_classifier()
    failures = 0
    for name in paths:
        try:
            image = load_image(Path(name).read_bytes(), name)
        except (OSError, InvalidImageError) as error:
            print(f"{name}\tERROR\t{error}")
            failures += 1
            continue
        prediction = classifier.predict([image])[0]
        print(f"{name}\t{prediction.label}\t{prediction.confidence:.1%}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
