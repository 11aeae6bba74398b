"""ResNet-18 inference for CIFAR-10: the model, its preprocessing and batched prediction.

Run as a script to classify files from the command line:

    python classifier.py photo1.jpg photo2.png
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from classes import CLASSES
from settings import SHIPPED_WEIGHTS

INPUT_SIZE = 32
# Per-channel statistics of the CIFAR-10 training images.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DEFAULT_WEIGHTS = SHIPPED_WEIGHTS
# Big enough for a fast forward pass, small enough to bound memory on huge batches.
CHUNK_SIZE = 64


class WeightsError(RuntimeError):
    """The weights file or its model card is missing or unusable; the message says which file and what to do."""


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float                 # calibrated: of the images shown this confidence, about that share are right
    top_k: list[tuple[str, float]]
    probabilities: list[float]
    ood_score: float = 0.0            # higher: less like the ten classes (1 - cosine to the nearest training image)
    is_ood: bool = False              # ood_score above the threshold that flags 5% of the CIFAR-10 test split


@dataclass(frozen=True)
class Calibration:
    """A temperature that depends on how clear the answer is: T = exp(a + b*s + c*s^2), s = log(top-1 minus top-2
    logit), s clamped to the range it was fitted on. Dividing every logit by one positive number never changes
    which is largest, so the predicted label is the same as without calibration."""

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    s_range: tuple[float, float] = (-7.0, 4.0)

    def temperatures(self, logits: torch.Tensor) -> torch.Tensor:
        top2 = logits.topk(2, dim=1).values
        s = (top2[:, 0] - top2[:, 1]).clamp_min(1e-3).log().clamp(*self.s_range)
        return (self.a + self.b * s + self.c * s * s).exp()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits / self.temperatures(logits).unsqueeze(1)).softmax(dim=1)


@dataclass(frozen=True)
class Novelty:
    """How unlike the ten classes an image is: 1 minus the cosine similarity of its penultimate features to the
    nearest of a bank of training images (normalised, fp16), flagged above a threshold."""

    bank: torch.Tensor
    threshold: float

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(features.float(), dim=1) @ self.bank.float().T
        return (1.0 - similarity.max(dim=1).values).clamp(min=0.0)  # rounding can push a cosine past 1


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (a 1x1 convolution where the shape changes): ResNet-18's block."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut)


class ResNet18(nn.Module):
    """The CIFAR variant of ResNet-18: a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep detail. The
    layers carry torchvision's names and initialisation (its weights load as they are), without importing
    torchvision, which would add a second to every start of the app and the command line."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        widths = (64, 128, 256, 512)
        for index, (in_channels, channels) in enumerate(zip((64, *widths), widths), start=1):
            stride = 1 if index == 1 else 2
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(in_channels, channels, stride),
                                                         BasicBlock(channels, channels, 1)))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_and_features(self, x)[0]


def build_model() -> nn.Module:
    return ResNet18()


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ResNet forward, keeping the pooled penultimate features the novelty score compares."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    features = torch.flatten(model.avgpool(x), 1)
    return model.fc(features), features


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


def save_atomically(path: Path, write) -> None:
    """write(temporary path), then rename over path: a run killed mid-save leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """Hash in 1 MB blocks: the weights (22 MB) and the data archive never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Classifier:
    """One loaded model shared by every Streamlit session; a lock keeps concurrent calls from fighting for the cores.

    Without a calibration and a novelty detector (as during training) it gives the raw softmax and no flag."""

    def __init__(self, model: nn.Module, version: str, use_bf16: bool | None = None,
                 test_accuracy: float | None = None, calibration: Calibration = Calibration(),
                 novelty: Novelty | None = None, low_confidence: float = 0.6) -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.device = next(model.parameters()).device
        self.version = version
        self.test_accuracy = test_accuracy
        self.calibration = calibration
        self.novelty = novelty
        self.low_confidence = low_confidence  # the page's default threshold for flagging a prediction
        self.use_bf16 = bf16_supported(self.device) if use_bf16 is None else use_bf16
        self._lock = threading.Lock()

    def outputs(self, batch: torch.Tensor, tta: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate features (on the CPU, float32) for a uint8 batch, each averaged over the image
        and its mirror when tta is on. Averaging logits (not probabilities) keeps calibration from moving the
        arg-max."""
        logits, features = [], []
        with self._lock, torch.inference_mode():
            for start in range(0, len(batch), CHUNK_SIZE):
                x = normalize(batch[start:start + CHUNK_SIZE].to(self.device))
                if tta:
                    x = torch.cat([x, x.flip(3)])
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                    chunk_logits, chunk_features = logits_and_features(self.model, x)
                chunk_logits, chunk_features = chunk_logits.float(), chunk_features.float()
                if tta:
                    chunk_logits = chunk_logits.view(2, -1, len(CLASSES)).mean(dim=0)
                    chunk_features = chunk_features.view(2, -1, chunk_features.shape[1]).mean(dim=0)
                logits.append(chunk_logits.cpu())
                features.append(chunk_features.cpu())
        if not logits:
            return torch.empty((0, len(CLASSES))), torch.empty((0, self.model.fc.in_features))
        return torch.cat(logits), torch.cat(features)

    def probabilities(self, batch: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Calibrated class probabilities for a uint8 batch."""
        return self.calibration.probabilities(self.outputs(batch, tta)[0])

    def predict(self, images: Sequence[Image.Image], top_k: int = 3) -> list[Prediction]:
        return self.predictions(*self.outputs(to_uint8_batch(images)), top_k=top_k)

    def predictions(self, logits: torch.Tensor, features: torch.Tensor, top_k: int = 3) -> list[Prediction]:
        """What predict says, from outputs already computed: the tests run the test split through the model once
        and read both the raw outputs and the predictions."""
        probabilities = self.calibration.probabilities(logits)
        scores = self.novelty.scores(features) if self.novelty is not None else torch.zeros(len(logits))
        predictions = []
        for row, score in zip(probabilities.tolist(), scores.tolist()):
            ranked = sorted(zip(CLASSES, row), key=lambda pair: pair[1], reverse=True)
            predictions.append(Prediction(
                label=ranked[0][0], confidence=ranked[0][1], top_k=ranked[:top_k], probabilities=row,
                ood_score=score, is_ood=self.novelty is not None and score > self.novelty.threshold,
            ))
        return predictions


def novelty_path(weights: Path) -> Path:
    """The novelty bank ships beside the weights: resnet18_cifar10.pt -> resnet18_cifar10.novelty.pt."""
    return weights.with_suffix(".novelty.pt")


def load_weights(path: Path) -> Classifier:
    """The model alone, uncalibrated and without a novelty score; its version is the file's hash, so saved rows
    say which model spoke."""
    hint = "Train a model with `python train.py` or restore the file from git."
    if not path.is_file():
        raise WeightsError(f"Model weights not found at {path}. {hint}")
    data = path.read_bytes()
    return Classifier(model_from_bytes(data, f"Model weights at {path}", hint),
                      version=f"{path.stem}@{hashlib.sha256(data).hexdigest()[:12]}")


def model_from_bytes(weights: bytes, what: str, hint: str) -> nn.Module:
    """The ResNet-18 of a weights file's bytes; WeightsError names `what` could not be loaded, and `hint` what to do."""
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model = build_model()
        model.load_state_dict({key: value.float() for key, value in state.items()})
    except Exception as error:
        raise WeightsError(f"{what} could not be loaded ({error}). {hint}") from error
    return model


def described_classifier(weights: bytes, card: dict, bank: bytes | None, version: str, names: tuple[str, str],
                         hints: tuple[str, str]) -> Classifier:
    """The model with the calibration, novelty threshold and bank its model card names; `names` say where the
    weights and the card come from, `hints` what to do about unusable weights and an unusable card. Weights that
    are not the ones the card describes are refused: the card's calibration and threshold were fitted on other
    weights (a training run that died between writing the two, or a store's files mixed up)."""
    weights_name, card_name = names
    weights_hint, card_hint = hints
    if card.get("weights_sha256") not in (None, hashlib.sha256(weights).hexdigest()):
        raise WeightsError(f"{card_name} describes other weights than {weights_name}, so its calibration and "
                           f"novelty threshold do not fit them. {card_hint}")
    model = model_from_bytes(weights, f"Model weights at {weights_name}", weights_hint)
    try:
        calibration = Calibration(**card.get("calibration", {}).get("parameters", {}))
        novelty = None
        if "novelty" in card:
            novelty = Novelty(torch.load(io.BytesIO(bank or b""), map_location="cpu", weights_only=True)["bank"],
                              float(card["novelty"]["threshold"]))
    except Exception as error:
        raise WeightsError(f"{card_name} (or its novelty bank) is unusable ({error.__class__.__name__}: {error}). "
                           f"{card_hint}") from error
    return Classifier(model, version, test_accuracy=card.get("test_accuracy_tta"), calibration=calibration,
                      novelty=novelty, low_confidence=card.get("low_confidence_threshold", 0.6))


def load_classifier(weights_path: str | Path | None = None) -> Classifier:
    """Load the shipped weights (or another file) with the calibration, novelty threshold and bank that their
    model card names."""
    path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    weights_hint = "Train a model with `python train.py` or restore the file from git."
    card_hint = (f"Describe the weights with `python evaluate.py --weights {path}`, or restore the weights, card and "
                 "bank from git.")
    if not path.is_file():
        raise WeightsError(f"Model weights not found at {path}. {weights_hint}")
    card_path = path.with_suffix(".json")
    weights = path.read_bytes()
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        bank = novelty_path(path).read_bytes() if "novelty" in card else None
    except (OSError, ValueError) as error:
        raise WeightsError(f"The model card {card_path} (or its novelty bank) is unusable ({error.__class__.__name__}: "
                           f"{error}). {card_hint}") from error
    return described_classifier(weights, card, bank, f"{path.stem}@{hashlib.sha256(weights).hexdigest()[:12]}",
                                (str(path), f"The model card {card_path}"), (weights_hint, card_hint))


def load_version(store, version, files: tuple[bytes, dict, bytes] | None = None) -> Classifier:
    """A version the store keeps (a versions.ModelVersion), named as the records it predicts name it; from its
    files as versions.version_files gives them, read here unless given."""
    from versions import version_files

    weights, card, bank = files if files is not None else version_files(store, version)
    where = f"model version {version.id} in {store.images.description}"
    never = f"Version {version.id} is never served: make another one active on the Model page."
    return described_classifier(weights, card, bank, version.name, (f"the weights of {where}", f"The card of {where}"),
                                (never, never))


def served_classifier() -> Classifier:
    """The version the configured store has active (the same environment settings as the pages), as the command
    line uses it; where the store cannot be reached, the shipped weights, said on stderr."""
    from records import StoreError
    from store import Store
    from versions import active_version

    try:
        store = Store.from_env()
    except StoreError as error:
        print(f"the store cannot be reached ({error}): classifying with the shipped weights", file=sys.stderr)
        return load_classifier()
    try:
        return load_version(store, active_version(store))
    finally:
        store.close()


def main(paths: Sequence[str]) -> int:
    from inputs import InvalidImageError, load_image

    if not paths:
        print("usage: python classifier.py PHOTO...", file=sys.stderr)
        return 2
    from records import StoreError

    try:
        classifier = served_classifier()
    except (WeightsError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"model {classifier.version}", flush=True)
    failures = 0
    for name in paths:
        try:
            image = load_image(Path(name).read_bytes(), name)
        except (OSError, InvalidImageError) as error:
            print(f"{name}\tERROR\t{error}")
            failures += 1
            continue
        prediction = classifier.predict([image])[0]
        flag = "\tmaybe none of these classes" if prediction.is_ood else ""
        print(f"{name}\t{prediction.label}\t{prediction.confidence:.1%}{flag}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
