"""Train the CIFAR-10 ResNet-18 from scratch, reproducibly and resumably, on a CPU or a CUDA GPU.

    python train.py                      # uses ../shared/data/cifar10-jpeg.tar.gz, else downloads CIFAR-10
    python train.py --data DIR           # ImageFolder-style train/ and test/, or a torchvision CIFAR-10 root
    python train.py --resume             # carry on from the last end-of-epoch checkpoint
    python train.py --epochs 150 --low-res-epochs 0 --batch-size 512 --lr 0.4   # the shipped model (GPU, 3 min)
    python train.py --finetune export.zip --out models/resnet18_cifar10.pt   # learn from saved corrections

Recipe: Nesterov SGD with a warm-up then linear decay to zero, label smoothing, flip + translate +
cutout done with tensor ops on uint8 data held in memory, bf16 autocast + channels_last, and
progressive resizing (the first epochs at 24x24, which costs about half as much per image).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from classifier import (CLASSES, Classifier, bf16_supported, build_model, file_sha256, load_classifier,
                        normalize, to_uint8_batch)

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUT = ROOT / "models" / "resnet18_cifar10.pt"
DEFAULT_CHECKPOINT = CACHE / "train" / "checkpoint.pt"


# ---------------------------------------------------------------- data

def decode_image_folder(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode <split>/<class>/*.jpg|png into uint8 (N, 3, 32, 32) images and int64 labels."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise SystemExit(f"{class_dir} is missing: expected one folder per CIFAR-10 class in {split_dir}")
        for path in sorted(class_dir.iterdir()):
            with Image.open(path) as image:
                images.append(to_uint8_batch([image.convert("RGB")]))
            labels.append(label)
    return torch.cat(images), torch.tensor(labels)


def extract_archive(archive: Path, archive_sha256: str) -> Path:
    """Extract the JPEG archive once into the git-ignored cache, keyed by its hash."""
    target = CACHE / f"cifar10-jpeg-{archive_sha256[:12]}"
    if not (target / "test").is_dir():
        partial = target.with_suffix(".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
        # The archive may hold train/ and test/ at its top or under one folder.
        inner = next(p.parent for p in partial.rglob("test") if (p.parent / "train").is_dir())
        inner.rename(target)
    return target


def load_cifar10(data: str | None) -> dict:
    """Uint8 tensors for both splits, decoded once and cached as .npz beside the extracted files."""
    source: dict = {}
    if data is None and SHARED_ARCHIVE.is_file():
        data = str(SHARED_ARCHIVE)
    if data is not None and Path(data).is_file():
        source = {"archive": str(Path(data).resolve()), "archive_sha256": file_sha256(Path(data))}
        folder = extract_archive(Path(data), source["archive_sha256"])
    elif data is not None and (Path(data) / "train").is_dir() and (Path(data) / "test").is_dir():
        folder = Path(data)
        source = {"folder": str(folder.resolve())}
    else:
        return load_torchvision_cifar10(Path(data) if data else CACHE / "cifar10-torchvision")

    cache_file = folder.with_name(folder.name + ".npz") if folder.is_relative_to(CACHE) else None
    if cache_file is not None and cache_file.is_file():
        arrays = dict(np.load(cache_file))
    else:
        train_x, train_y = decode_image_folder(folder / "train")
        test_x, test_y = decode_image_folder(folder / "test")
        arrays = {"train_x": train_x.numpy(), "train_y": train_y.numpy(),
                  "test_x": test_x.numpy(), "test_y": test_y.numpy()}
        if cache_file is not None:
            np.savez(cache_file, **arrays)
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    return {**tensors, "source": source}


def load_torchvision_cifar10(root: Path) -> dict:
    """The original CIFAR-10 through torchvision, downloaded into root when missing (needs internet)."""
    from torchvision.datasets import CIFAR10

    splits = {}
    for name, train in (("train", True), ("test", False)):
        dataset = CIFAR10(str(root), train=train, download=True)
        splits[f"{name}_x"] = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        splits[f"{name}_y"] = torch.tensor(dataset.targets)
    return {**splits, "source": {"torchvision_root": str(root.resolve())}}


# ---------------------------------------------------------------- augmentation

def augment(images: torch.Tensor, translate: int, cutout: int, generator: torch.Generator) -> torch.Tensor:
    """Random mirror, translation (reflect-padded crop) and cutout on a uint8 batch; returns normalised floats."""
    n, _, h, w = images.shape
    device = images.device
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    if translate:
        padded = F.pad(images.float(), (translate,) * 4, mode="reflect")
        dy = torch.randint(0, 2 * translate + 1, (n,), generator=generator, device=device)
        dx = torch.randint(0, 2 * translate + 1, (n,), generator=generator, device=device)
        rows = (dy.view(-1, 1) + torch.arange(h, device=device)).view(n, 1, h, 1)
        cols = (dx.view(-1, 1) + torch.arange(w, device=device)).view(n, 1, 1, w)
        batch_index = torch.arange(n, device=device).view(n, 1, 1, 1)
        channel_index = torch.arange(3, device=device).view(1, 3, 1, 1)
        images = padded[batch_index, channel_index, rows, cols]
    x = normalize(images)
    if cutout:
        cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=device)
        cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=device)
        ys, xs = torch.arange(h, device=device).view(1, h, 1), torch.arange(w, device=device).view(1, 1, w)
        hole = ((ys - cy).abs() <= cutout // 2) & ((xs - cx).abs() <= cutout // 2)
        x = x.masked_fill(hole.unsqueeze(1), 0.0)
    return x


# ---------------------------------------------------------------- training

def learning_rate(step: int, total_steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up from a tenth of the peak, then linear decay to zero."""
    warmup_steps = max(1, int(total_steps * warmup))
    if step < warmup_steps:
        return peak * (0.1 + 0.9 * step / warmup_steps)
    return peak * max(0.0, (total_steps - step) / (total_steps - warmup_steps))


def evaluate_tensors(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, tta: bool) -> torch.Tensor:
    """Predicted labels for a uint8 test split, through the same code path as the app."""
    classifier = Classifier(model, version="training")
    predictions = classifier.probabilities(images, tta=tta).argmax(dim=1)
    model.train()
    return predictions


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def show_progress(epoch: int, epochs: int, step: int, steps: int, loss: torch.Tensor, rate: float,
                  run_left: float) -> None:
    """One bar line, redrawn in place on a terminal and printed every 50 steps into a log file. The loss stays a
    tensor until printed, so a GPU is not made to wait for it every step."""
    on_terminal = sys.stderr.isatty()
    if not (on_terminal or step % 50 == 0 or step == steps):
        return
    filled = int(24 * step / steps)
    line = (f"epoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (24 - filled)}] {step}/{steps} "
            f"loss {loss.item():.3f} {rate:.0f} img/s ETA {format_seconds(run_left)}")
    print("\r" + line if on_terminal else line, end="" if on_terminal else "\n", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="CIFAR-10 archive, ImageFolder train/test folder, or torchvision root")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when a GPU is visible, else cpu")
    parser.add_argument("--epochs", type=int, default=22)
    parser.add_argument("--low-res-epochs", type=int, default=10, help="first epochs trained at --low-res pixels")
    parser.add_argument("--low-res", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.15, help="fraction of steps spent warming up")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--translate", type=int, default=4)
    parser.add_argument("--cutout", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=4, help="epochs between test evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the fp16 weights go")
    parser.add_argument("--finetune", metavar="EXPORT_ZIP_OR_DIR",
                        help="fine-tune --weights on images exported from the History page instead of training")
    parser.add_argument("--weights", type=Path, default=DEFAULT_OUT, help="the model --finetune starts from")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-mix", type=int, default=10, help="CIFAR-10 images per exported image")
    parser.add_argument("--max-drop", type=float, default=0.003, help="largest test-accuracy drop accepted")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA GPU here; use --device cpu")
    return args


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace, generator: torch.Generator, resolution: int, epoch: int, epochs: int,
                lr_at_step) -> float:
    """One pass over shuffled, augmented batches (images, labels and generator on the model's device);
    returns the smoothed loss."""
    device = images.device
    use_bf16 = bf16_supported(device)
    steps = len(images) // args.batch_size
    order = torch.randperm(len(images), generator=generator, device=device)
    started, running_loss = time.time(), torch.zeros((), device=device)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(epoch * steps + step)
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        x = augment(images[index], args.translate, args.cutout, generator)
        if resolution != x.shape[-1]:
            x = F.interpolate(x, size=resolution, mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running_loss = loss.detach() if step == 0 else 0.98 * running_loss + 0.02 * loss.detach()
        rate = (step + 1) * args.batch_size / (time.time() - started)
        images_left = (steps - step - 1 + (epochs - epoch - 1) * steps) * args.batch_size
        show_progress(epoch, epochs, step + 1, steps, running_loss, rate, images_left / rate)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return running_loss.item()


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, {platform.system()} {platform.release()}"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write then rename, so a run killed mid-save still has its previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    data = load_cifar10(args.data)
    train_x, train_y = data["train_x"], data["train_y"]
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = data["test_x"], data["test_y"]
    print(f"data: {len(train_x)} training and {len(test_x)} test images from {data['source']}", flush=True)

    model = build_model().to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    history, start_epoch, elapsed = [], 0, 0.0
    if args.resume:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        history, start_epoch, elapsed = checkpoint["history"], checkpoint["epoch"], checkpoint["elapsed"]
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}", flush=True)
    bf16 = bf16_supported(device)
    print(f"{args.epochs} epochs, {steps_per_epoch} steps each on {device}, bf16 autocast {'on' if bf16 else 'off'}",
          flush=True)

    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        resolution = args.low_res if epoch < args.low_res_epochs else 32
        running_loss = train_epoch(model, optimizer, train_x, train_y, args, generator, resolution,
                                   epoch, args.epochs, lambda step: learning_rate(step, total_steps, args.lr, args.warmup))
        seconds = time.time() - started
        elapsed += seconds
        record = {"epoch": epoch + 1, "resolution": resolution, "loss": round(running_loss, 4), "seconds": round(seconds, 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            predicted = evaluate_tensors(model, test_x, test_y, tta=False)
            record["test_accuracy"] = round((predicted == test_y).float().mean().item(), 4)
        history.append(record)
        print(json.dumps(record), flush=True)
        save_checkpoint(args.checkpoint, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "history": history, "epoch": epoch + 1, "elapsed": elapsed, "args": vars(args),
        })

    return write_model(model, args, data, history, elapsed, test_metrics(model, test_x, test_y))


def load_export(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and final labels from the app's export: the ZIP or its unpacked folder (<label>/<file>)."""
    from inputs import MAX_FILE_BYTES, InvalidImageError, load_image

    entries: list[tuple[str, str, bytes]] = []
    if path.is_file():
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                label, _, name = info.filename.partition("/")
                if label in CLASSES and name and "/" not in name and info.file_size <= MAX_FILE_BYTES:
                    entries.append((label, info.filename, archive.read(info)))
    else:
        for label in CLASSES:
            if (path / label).is_dir():
                entries += [(label, str(file), file.read_bytes()) for file in sorted((path / label).iterdir())
                            if file.is_file() and file.stat().st_size <= MAX_FILE_BYTES]
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


def finetune(args: argparse.Namespace) -> dict | None:
    """Fine-tune the shipped model on exported corrections mixed with CIFAR-10 training images (so it does
    not forget), and replace the weights only if CIFAR-10 test accuracy drops by no more than --max-drop."""
    torch.manual_seed(args.seed)
    data = load_cifar10(args.data)
    test_x, test_y = data["test_x"], data["test_y"]
    device = torch.device(args.device)
    base = load_classifier(args.weights)
    model = base.model.to(device).train()
    base_accuracy = (evaluate_tensors(model, test_x, test_y, tta=True) == test_y).float().mean().item()
    export_x, export_y = load_export(Path(args.finetune))
    generator = torch.Generator().manual_seed(args.seed)
    mixed = max(args.finetune_mix * len(export_x), 5000)
    sample = torch.randperm(len(data["train_x"]), generator=generator)[:mixed]
    repeats = max(1, len(sample) // (4 * len(export_x)))  # corrections make up about a fifth of each epoch
    images = torch.cat([data["train_x"][sample], export_x.repeat(repeats, 1, 1, 1)]).to(device)
    labels = torch.cat([data["train_y"][sample], export_y.repeat(repeats)]).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    print(f"fine-tuning {base.version} (test accuracy {base_accuracy:.2%}) on {len(export_x)} exported images "
          f"x{repeats} mixed with {len(sample)} CIFAR-10 training images", flush=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=args.finetune_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    total_steps = args.finetune_epochs * (len(images) // args.batch_size)
    started, history = time.time(), []
    for epoch in range(args.finetune_epochs):
        loss = train_epoch(model, optimizer, images, labels, args, generator, 32, epoch, args.finetune_epochs,
                           lambda step: args.finetune_lr * (1 - step / max(1, total_steps)))
        history.append({"epoch": epoch + 1, "loss": round(loss, 4)})
    metrics = test_metrics(model, test_x, test_y)
    accuracy = metrics["test_accuracy_tta"]
    print(f"CIFAR-10 test accuracy {base_accuracy:.2%} -> {accuracy:.2%}", flush=True)
    if accuracy < base_accuracy - args.max_drop:
        print(f"not saved: accuracy dropped by more than {args.max_drop:.1%} points; {args.out} is unchanged")
        return None
    return write_model(model, args, data, history, time.time() - started, metrics, extra={
        "finetuned_from": base.version, "base_test_accuracy_tta": round(base_accuracy, 4),
        "finetune_images": len(export_x),
    })


def test_metrics(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    """Test accuracy with and without flip TTA, and per class with TTA: what the model card reports."""
    plain = evaluate_tensors(model, test_x, test_y, tta=False)
    mirrored = evaluate_tensors(model, test_x, test_y, tta=True)
    return {
        "test_accuracy": round((plain == test_y).float().mean().item(), 4),
        "test_accuracy_tta": round((mirrored == test_y).float().mean().item(), 4),
        "per_class_accuracy_tta": {name: round((mirrored[test_y == i] == i).float().mean().item(), 4)
                                   for i, name in enumerate(CLASSES)},
    }


def write_model(model: torch.nn.Module, args: argparse.Namespace, data: dict, history: list, elapsed: float,
                metrics: dict, extra: dict | None = None) -> dict:
    """Save fp16 weights (half the size, no measurable accuracy change) and a model card beside them."""
    card = {
        "model": "ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), 11.2M parameters",
        **metrics,
        "test_images": len(data["test_y"]),
        "epochs": len(history),
        "training_seconds": round(elapsed),
        "history": history,
        "hyperparameters": {key: value for key, value in vars(args).items()
                            if key not in {"data", "checkpoint", "resume", "out", "weights"}},
        "data": data["source"],
        "machine": machine_description(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        **(extra or {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: (value.half() if value.is_floating_point() else value).cpu()
                for key, value in model.state_dict().items()}, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out}: test accuracy {card['test_accuracy']:.2%}, with flip TTA {card['test_accuracy_tta']:.2%}")
    return card


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.finetune:
        finetune(arguments)
    else:
        train(arguments)
