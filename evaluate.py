"""Describe a model: accuracy, calibration and the "none of the ten" score, written into its model card.

    python evaluate.py                        # the shipped weights; ../shared/data archive (or --data)
    python evaluate.py --weights other.pt     # any weights; their card, bank and PNGs go beside them

Everything runs through Classifier (the app's own code path). In order:
1. accuracy on the CIFAR-10 test split, with and without flip TTA, per class, and a confusion-matrix PNG;
2. calibration, fitted on one half of the test split (a fixed random half) and measured on the other: expected
   calibration error (15 equal-width bins) before and after, and a reliability-diagram PNG;
3. the novelty score: a bank of training images' features (class-balanced), its threshold (5% of the test split
   flagged), and AUROC against the photos of other animals in ../shared/data/not-cifar10-dev, both vs the
   test split and vs test images made to look like photos (upscaled, re-compressed, read back as uploads);
4. real photos of the ten classes (../shared/data/real-photos-dev), through Classifier.predict with the
   calibration and novelty score just fitted, as the app calls it: how many are right, calibration error,
   share flagged "none of the ten", and AUROC of that score against not-cifar10-dev. Measured, never fitted.
train.py and finetune.py call describe_model on the weights they write.
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from classes import CLASSES
from cifar10 import load_cifar10
from classifier import Calibration, Classifier, file_sha256, novelty_path, save_atomically, to_uint8_batch

# ---------------------------------------------------------------- settings
CALIBRATION_SEED = 0       # which half of the test split fits the calibration; the other half measures it
ECE_BINS = 15
BANK_PER_CLASS = 500       # training images per class in the novelty bank: 5,000 x 512 fp16 = 5 MB
FLAGGED_SHARE = 0.05       # the threshold flags this share of the CIFAR-10 test split
LOW_CONFIDENCE_ERRORS = 0.5  # the page's default flag catches at least this share of the model's mistakes
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
NOT_CIFAR10 = SHARED_DATA / "not-cifar10-dev"
REAL_PHOTOS = SHARED_DATA / "real-photos-dev"   # <class>/<photo>.jpg


# ---------------------------------------------------------------- accuracy

def evaluate(model: Classifier | nn.Module, images: torch.Tensor, labels: torch.Tensor, tta: bool = True) -> dict:
    """Accuracy, per-class accuracy and confusion matrix on uint8 images: the one evaluation used by training,
    fine-tuning and this script."""
    classifier = model if isinstance(model, Classifier) else Classifier(model, version="evaluation")
    return accuracy_report(classifier.outputs(images, tta=tta)[0].argmax(dim=1), labels)


def accuracy_report(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows true, columns predicted) of predicted labels."""
    matrix = torch.zeros((len(CLASSES), len(CLASSES)), dtype=torch.long)
    matrix.index_put_((labels.long(), predicted), torch.ones_like(predicted), accumulate=True)
    correct = matrix.diagonal()
    return {
        "accuracy": correct.sum().item() / max(1, len(labels)),
        "per_class_accuracy": {name: correct[i].item() / max(1, matrix[i].sum().item()) for i, name in enumerate(CLASSES)},
        "confusion_matrix": matrix.tolist(),
        "images": len(labels),
    }


# ---------------------------------------------------------------- calibration

def calibration_bins(probabilities: torch.Tensor, labels: torch.Tensor,
                     bins: int = ECE_BINS) -> list[tuple[float, float, float]]:
    """(share of the images, mean confidence, share correct) of each non-empty equal-width confidence bin
    (low, high]: what the calibration error sums and the reliability diagram draws."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    measured = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            measured.append((inside.float().mean().item(), confidence[inside].mean().item(),
                             correct[inside].mean().item()))
    return measured


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    return sum(share * abs(accuracy - confidence)
               for share, confidence, accuracy in calibration_bins(probabilities, labels, bins))


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> Calibration:
    """The three numbers of Calibration that minimise the negative log-likelihood (L-BFGS, float64), each image's
    weighted by `weights` if given (a few hundred photos can then count as much as thousands of test images)."""
    logits = logits.double()
    weights = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double()
    weights = weights / weights.sum()
    top2 = logits.topk(2, dim=1).values
    s = (top2[:, 0] - top2[:, 1]).clamp_min(1e-3).log()
    parameters = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([parameters], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        temperature = (parameters[0] + parameters[1] * s + parameters[2] * s * s).exp()
        loss = (nn.functional.cross_entropy(logits / temperature.unsqueeze(1), labels, reduction="none") * weights).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b, c = (round(value, 6) for value in parameters.detach().tolist())
    return Calibration(a, b, c, (round(s.min().item(), 4), round(s.max().item(), 4)))


def reliability_figure(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """Accuracy against confidence per bin, before and after calibration, on the held-out half."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), layout="constrained")
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for probabilities, name in ((before, "before"), (after, "after")):
        measured = calibration_bins(probabilities, labels)
        axes.plot([confidence for _, confidence, _ in measured], [accuracy for _, _, accuracy in measured],
                  marker="o", label=f"{name}: ECE {expected_calibration_error(probabilities, labels):.1%}")
    axes.set_xlabel("confidence shown")
    axes.set_ylabel("share correct")
    axes.set_title("Reliability on the held-out half of the CIFAR-10 test split", fontsize=9)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def low_confidence_threshold(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """The lowest 5%-step threshold whose flag catches at least LOW_CONFIDENCE_ERRORS of the mistakes."""
    confidence, predicted = probabilities.max(dim=1)
    wrong = predicted != labels
    for percent in range(5, 100, 5):
        if (confidence[wrong] < percent / 100).float().mean().item() >= LOW_CONFIDENCE_ERRORS:
            return percent / 100
    return 0.95


# ---------------------------------------------------------------- "none of the ten"

def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The chance that a positive (not one of the ten) scores above a negative; ties count half."""
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    return ((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def bank_indices(labels: torch.Tensor) -> torch.Tensor:
    """BANK_PER_CLASS training images of each class, a fixed random choice: the novelty bank's, and the CIFAR-10
    images a fine-tuning job mixes with the feedback."""
    generator = torch.Generator().manual_seed(0)
    return torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
                      [:BANK_PER_CLASS] for c in range(len(CLASSES))])


def calibration_halves(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split's fixed random half that fits the calibration, and the other half, which measures it."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    return order[:count // 2], order[count // 2:]


def novelty_bank(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised features of the bank's training images (bank_indices), fp16."""
    return nn.functional.normalize(classifier.outputs(images[bank_indices(labels)])[1], dim=1).half()


def photo_like(images: torch.Tensor, size: int = 96, quality: int = 80) -> torch.Tensor:
    """CIFAR images made to look like photo uploads: upscaled, JPEG re-compressed, read back as the app reads."""
    from inputs import load_image

    uploads = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.BICUBIC).save(
            buffer, "JPEG", quality=quality)
        uploads.append(load_image(buffer.getvalue(), "photo-like.jpg"))
    return to_uint8_batch(uploads)


def read_photos(folder: Path, groups: Sequence[str] | None = None) -> tuple[list[Image.Image], list[str]] | None:
    """The photos in folder/<group>/ (only the groups named, if any), read as the app reads uploads, and each
    one's group; None if there are none. Hidden files are passed over, and what is not a picture is skipped
    with a warning: a stray file must not stop a model's description halfway."""
    from inputs import InvalidImageError, load_image

    paths = sorted(path for path in folder.glob("*/*") if path.is_file() and not path.name.startswith(".")
                   and not path.parent.name.startswith(".")) if folder.is_dir() else []
    images, names = [], []
    for path in paths:
        if groups is not None and path.parent.name not in groups:
            warnings.warn(f"skipped {path}: {path.parent.name}/ is not one of {', '.join(groups)}", stacklevel=2)
            continue
        try:
            images.append(load_image(path.read_bytes(), path.name))
        except (OSError, InvalidImageError) as error:
            warnings.warn(f"skipped {path}: {error}", stacklevel=2)
            continue
        names.append(path.parent.name)
    return (images, names) if images else None


def not_cifar10_photos(folder: Path = NOT_CIFAR10) -> torch.Tensor | None:
    photos = read_photos(folder)
    return None if photos is None else to_uint8_batch(photos[0])


def real_photos_report(classifier: Classifier, others: torch.Tensor | None, folder: Path = REAL_PHOTOS) -> dict | None:
    """What a person uploading photos of the ten classes gets from classifier (calibrated, with its novelty
    score): counts rather than decimals, as the set is small; None without the photos."""
    photos = read_photos(folder, CLASSES)
    if photos is None:
        return None
    images, groups = photos
    labels = torch.tensor([CLASSES.index(group) for group in groups])
    predictions = classifier.predict(images)
    probabilities = torch.tensor([prediction.probabilities for prediction in predictions])
    predicted = probabilities.argmax(dim=1)
    mistakes: dict[str, int] = {}
    for truth, guess in zip(labels.tolist(), predicted.tolist()):
        if truth != guess:
            pair = f"{CLASSES[truth]} -> {CLASSES[guess]}"
            mistakes[pair] = mistakes.get(pair, 0) + 1
    report = {
        "folder": folder.name,
        "photos": len(labels),
        "right": int((predicted == labels).sum()),
        "ece": round(expected_calibration_error(probabilities, labels), 4),
        "mean_confidence": round(probabilities.max(dim=1).values.mean().item(), 4),
        "flagged": sum(prediction.is_ood for prediction in predictions),
        "most_confused": dict(sorted(mistakes.items(), key=lambda item: -item[1])[:5]),
    }
    if others is not None and classifier.novelty is not None:
        other_scores = classifier.novelty.scores(classifier.outputs(others)[1])
        scores = torch.tensor([prediction.ood_score for prediction in predictions])
        report["auroc_not_cifar10_vs_these"] = round(auroc(other_scores, scores), 4)
    return report


# ---------------------------------------------------------------- the model card

def describe_model(weights: Path, data: dict, card: dict, device: str | torch.device = "cpu") -> dict:
    """Measure the weights at `weights` on `data` (the model on `device`: a GPU that just trained it does in
    seconds what takes the CPU minutes) and write their model card (card's fields plus what is measured here),
    novelty bank, confusion matrix and reliability diagram beside them; the card and bank last, together."""
    from charts import confusion_matrix_figure
    from classifier import Novelty, load_weights

    raw = load_weights(weights)  # uncalibrated: its old card and bank, if any, are replaced below
    raw = Classifier(raw.model.to(device), raw.version)
    test_x, test_y = data["test_x"], data["test_y"]
    plain = evaluate(raw, test_x, test_y, tta=False)
    logits, features = raw.outputs(test_x)
    result = accuracy_report(logits.argmax(dim=1), test_y)
    stem = weights.with_suffix("")
    confusion_matrix_figure(result["confusion_matrix"], f"CIFAR-10 test split, accuracy {result['accuracy']:.2%}") \
        .savefig(stem.with_name(stem.name + ".confusion.png"), dpi=120)

    fit_half, held_out = calibration_halves(len(test_y))
    calibration = fit_calibration(logits[fit_half], test_y[fit_half])
    before, after = logits[held_out].softmax(dim=1), calibration.probabilities(logits[held_out])
    reliability_figure(before, after, test_y[held_out], stem.with_name(stem.name + ".reliability.png"))

    bank = novelty_bank(raw, data["train_x"], data["train_y"])
    novelty = Novelty(bank, 0.0)
    test_scores = novelty.scores(features)
    threshold = torch.quantile(test_scores, 1 - FLAGGED_SHARE).item()
    others = not_cifar10_photos()
    novelty_card = {
        "method": "1 - cosine similarity of the penultimate features (flip-averaged) to the nearest of "
                  f"{len(bank)} training images ({BANK_PER_CLASS} per class)",
        "threshold": round(threshold, 6),
        "bank_file": novelty_path(weights).name,
        "test_flagged": round((test_scores > threshold).float().mean().item(), 4),
    }
    if others is not None:
        other_logits, other_features = raw.outputs(others)
        like_photos_logits, like_photos_features = raw.outputs(photo_like(test_x))
        other_scores, photo_scores = novelty.scores(other_features), novelty.scores(like_photos_features)
        msp = {name: -values.softmax(dim=1).max(dim=1).values
               for name, values in (("other", other_logits), ("test", logits), ("photo", like_photos_logits))}
        novelty_card |= {
            "not_cifar10_photos": len(others),
            "auroc_vs_test_split": round(auroc(other_scores, test_scores), 4),
            "auroc_vs_photo_like_test_split": round(auroc(other_scores, photo_scores), 4),
            "not_cifar10_flagged": round((other_scores > threshold).float().mean().item(), 4),
            "photo_like_flagged": round((photo_scores > threshold).float().mean().item(), 4),
            "max_softmax_auroc_vs_test_split": round(auroc(msp["other"], msp["test"]), 4),
            "max_softmax_auroc_vs_photo_like_test_split": round(auroc(msp["other"], msp["photo"]), 4),
        }

    calibrated = Classifier(raw.model, raw.version, calibration=calibration,
                            novelty=Novelty(bank, round(threshold, 6)))
    real_photos = real_photos_report(calibrated, others, REAL_PHOTOS)

    card = {
        **card,
        "test_accuracy": round(plain["accuracy"], 4),
        "test_accuracy_tta": round(result["accuracy"], 4),
        "per_class_accuracy_tta": {name: round(value, 4) for name, value in result["per_class_accuracy"].items()},
        "test_images": len(test_y),
        "weights_sha256": file_sha256(weights),
        "calibration": {
            "method": "temperature depending on the logit gap: T = exp(a + b*s + c*s^2), s = log(top-1 - top-2 logit)",
            "parameters": {"a": calibration.a, "b": calibration.b, "c": calibration.c, "s_range": calibration.s_range},
            "fitted_on": f"{len(fit_half)} test images (seed {CALIBRATION_SEED}); measured on the other {len(held_out)}",
            "ece_before": round(expected_calibration_error(before, test_y[held_out]), 4),
            "ece_after": round(expected_calibration_error(after, test_y[held_out]), 4),
            "mean_confidence_before": round(before.max(dim=1).values.mean().item(), 4),
            "mean_confidence_after": round(after.max(dim=1).values.mean().item(), 4),
        },
        "low_confidence_threshold": low_confidence_threshold(after, test_y[held_out]),
        "novelty": novelty_card,
        **({"real_photos": real_photos} if real_photos is not None else {}),
    }
    save_atomically(novelty_path(weights), lambda path: torch.save({"bank": bank}, path))
    save_atomically(weights.with_suffix(".json"), lambda path: path.write_text(json.dumps(card, indent=2) + "\n"))
    print(f"{weights}: test accuracy {card['test_accuracy']:.2%}, with flip TTA {card['test_accuracy_tta']:.2%}; "
          f"ECE {card['calibration']['ece_before']:.1%} -> {card['calibration']['ece_after']:.1%}; "
          f"novelty threshold {threshold:.4f}" + (f", AUROC {novelty_card['auroc_vs_test_split']:.3f} vs the test "
                                                 f"split, {novelty_card['auroc_vs_photo_like_test_split']:.3f} vs "
                                                 "photo-like test images" if others is not None else ""), flush=True)
    if real_photos is not None:
        print(f"real photos of the ten: {real_photos['right']} of {real_photos['photos']} right, ECE "
              f"{real_photos['ece']:.1%}, {real_photos['flagged']} flagged none of the ten"
              + (f", AUROC {real_photos['auroc_not_cifar10_vs_these']:.3f} against not-cifar10-dev"
                 if "auroc_not_cifar10_vs_these" in real_photos else ""), flush=True)
    return card


def main() -> None:
    from classifier import DEFAULT_WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="weights file (default: the shipped one)")
    parser.add_argument("--data", help="CIFAR-10 archive, ImageFolder train/test folder, or torchvision root")
    args = parser.parse_args()
    card_path = args.weights.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    except ValueError:
        card = {}  # rebuilt from what is measured now; the training history it held is lost
    card = describe_model(args.weights, load_cifar10(args.data), card)
    for name, accuracy in card["per_class_accuracy_tta"].items():
        print(f"  {name:<10} {accuracy:.1%}")
    print(json.dumps({key: card[key] for key in ("test_accuracy_tta", "calibration", "novelty", "real_photos")
                      if key in card}, indent=2))


if __name__ == "__main__":
    main()
