"""Fine-tune the shipped model on corrections saved in the app, without forgetting CIFAR-10.

    python finetune.py cifar10_feedback.zip          # the History page's ZIP (or `python db.py export`)
    python finetune.py export_folder/ --max-drop 0.001

The exported images (their final labels) are mixed with CIFAR-10 training images, so that they make up about
a fifth of each epoch; the result replaces --out only if CIFAR-10 test accuracy (with flip TTA) dropped by no
more than --max-drop. A replaced model is described anew: model card, calibration, "none of the ten".
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import torch

from classes import CLASSES
from classifier import load_classifier, to_uint8_batch
from cifar10 import load_cifar10
from train import (DEFAULT_OUT, HYPERPARAMETERS as TRAINING, add_common_arguments, check_device, steps_per_epoch,
                   train_epoch, write_model)

# ---------------------------------------------------------------- hyperparameters
HYPERPARAMETERS = dict(
    epochs=2,            # short: the model already knows CIFAR-10
    lr=0.01,             # a tenth of the from-scratch peak, decayed linearly to zero
    mix=10,              # CIFAR-10 training images per exported image (at least 5,000 in all)
    batch_size=128,
    max_drop=0.003,      # the largest drop in CIFAR-10 test accuracy accepted (0.3 points)
    weight_decay=5e-4,
    label_smoothing=0.2,
    translate=4,
    cutout=8,
    photo_augment=TRAINING["photo_augment"],  # as the model was trained
    pixmix=TRAINING["pixmix"],
    seed=0,
)


def load_export(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and final labels from the app's export: the ZIP or its unpacked folder (<label>/<file>)."""
    from inputs import MAX_FILE_BYTES, InvalidImageError, load_image

    entries: list[tuple[str, str, bytes]] = []
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    label, _, name = info.filename.partition("/")
                    if label in CLASSES and name and "/" not in name and info.file_size <= MAX_FILE_BYTES:
                        entries.append((label, info.filename, archive.read(info)))
        except zipfile.BadZipFile as error:
            raise SystemExit(f"{path} is not a ZIP archive ({error})") from error
    elif path.is_dir():
        for label in CLASSES:
            if (path / label).is_dir():
                entries += [(label, str(file), file.read_bytes()) for file in sorted((path / label).iterdir())
                            if file.is_file() and file.stat().st_size <= MAX_FILE_BYTES]
    else:
        raise SystemExit(f"{path}: no such file or folder")
    images, labels = [], []
    for label, name, data in entries:
        try:
            images.append(to_uint8_batch([load_image(data, name)]))
        except InvalidImageError as error:
            print(f"skipped: {error}", flush=True)
            continue
        labels.append(CLASSES.index(label))
    if not images:
        raise SystemExit(f"{path} holds no usable images in <label>/<file> layout (an export from the History page)")
    return torch.cat(images), torch.tensor(labels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="the ZIP from the History page or `python db.py export`, or its folder")
    add_common_arguments(parser)
    parser.add_argument("--weights", type=Path, default=DEFAULT_OUT, help="the model to start from")
    for name, default in HYPERPARAMETERS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return check_device(parser, parser.parse_args(argv))


def finetune(args: argparse.Namespace) -> dict | None:
    """Returns the new model card, or None when the accuracy guard kept the old weights."""
    from evaluate import evaluate

    torch.manual_seed(args.seed)
    data = load_cifar10(args.data)
    test_x, test_y = data["test_x"], data["test_y"]
    device = torch.device(args.device)
    base = load_classifier(args.weights)
    base_accuracy = evaluate(base, test_x, test_y)["accuracy"]
    export_x, export_y = load_export(args.export)
    generator = torch.Generator().manual_seed(args.seed)
    sample = torch.randperm(len(data["train_x"]), generator=generator)[:max(args.mix * len(export_x), 5000)]
    repeats = max(1, len(sample) // (4 * len(export_x)))  # corrections make up about a fifth of each epoch
    images = torch.cat([data["train_x"][sample], export_x.repeat(repeats, 1, 1, 1)]).to(device)
    labels = torch.cat([data["train_y"][sample], export_y.repeat(repeats)]).to(device)
    print(f"fine-tuning {base.version} (test accuracy {base_accuracy:.2%}) on {len(export_x)} exported images "
          f"x{repeats} mixed with {len(sample)} CIFAR-10 training images", flush=True)

    model = base.model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    device_generator = torch.Generator(device=device).manual_seed(args.seed)
    total_steps = args.epochs * steps_per_epoch(len(images), args.batch_size)
    started, history = time.time(), []
    for epoch in range(args.epochs):
        loss = train_epoch(model, optimizer, images, labels, args, device_generator, 32, epoch, args.epochs,
                           lambda step: args.lr * (1 - step / max(1, total_steps)))
        history.append({"epoch": epoch + 1, "loss": round(loss, 4)})
    accuracy = evaluate(model, test_x, test_y)["accuracy"]
    print(f"CIFAR-10 test accuracy {base_accuracy:.2%} -> {accuracy:.2%}", flush=True)
    if accuracy < base_accuracy - args.max_drop:
        print(f"not saved: accuracy dropped by more than {args.max_drop:.1%} points; {args.out} is unchanged")
        return None
    return write_model(model, args.out, data, {
        "epochs": len(history), "training_seconds": round(time.time() - started), "history": history,
        "hyperparameters": {name: getattr(args, name) for name in HYPERPARAMETERS},
        "finetuned_from": base.version, "base_test_accuracy_tta": round(base_accuracy, 4),
        "finetune_images": len(export_x),
    })


if __name__ == "__main__":
    finetune(parse_args())
