"""Train the CIFAR-10 ResNet-18 from scratch, reproducibly and resumably, on a CPU or a CUDA GPU.

    python train.py                      # the CPU recipe below; ../shared/data/cifar10-jpeg.tar.gz, else a download
    python train.py --data DIR           # ImageFolder-style train/ and test/, or a torchvision CIFAR-10 root
    python train.py --resume             # carry on from the last end-of-epoch checkpoint
    python train.py --epochs 150 --low-res-epochs 0 --batch-size 512 --lr 0.4   # the shipped model (GPU, 3 min)

Recipe: Nesterov SGD with a warm-up then linear decay to zero, label smoothing, flip + translate + cutout
done with tensor ops on uint8 data held in memory, bf16 autocast + channels_last, and progressive resizing
(the first epochs at 24x24, which costs about half as much per image). The weights, their model card, the
calibration and the "none of the ten" statistics are written at the end (evaluate.describe_model).
Fine-tuning on saved corrections is finetune.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar10 import CACHE, load_cifar10
from classifier import bf16_supported, build_model, normalize, save_atomically

# ---------------------------------------------------------------- hyperparameters
# The CPU recipe: 22 epochs, about 2 hours on 2 cores, 91% with flip TTA. Every one is a flag (--help);
# the shipped GPU model overrides four of them (see the command in the docstring).
HYPERPARAMETERS = dict(
    epochs=22,              # passes over the 50,000 training images
    low_res_epochs=10,      # the first epochs train at low_res pixels: about half the cost per image
    low_res=24,
    batch_size=128,
    lr=0.1,                 # peak learning rate of Nesterov SGD (momentum 0.9)...
    warmup=0.15,            # ...reached after this fraction of the steps, then decayed linearly to zero
    weight_decay=5e-4,
    label_smoothing=0.2,
    translate=4,            # random shifts of up to this many pixels (reflect-padded)
    cutout=8,               # a square of this side blanked at a random place
    eval_every=4,           # epochs between test evaluations (without TTA) in the history
    seed=0,
)

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "models" / "resnet18_cifar10.pt"
DEFAULT_CHECKPOINT = CACHE / "train" / "checkpoint.pt"


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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags train.py and finetune.py share."""
    parser.add_argument("--data", help="CIFAR-10 archive, ImageFolder train/test folder, or torchvision root")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when a GPU is visible, else cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the fp16 weights go")


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA GPU here; use --device cpu")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    for name, default in HYPERPARAMETERS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = check_device(parser, parser.parse_args(argv))
    if args.resume and not args.checkpoint.is_file():
        parser.error(f"--resume: no checkpoint at {args.checkpoint}; start without --resume (or give --checkpoint)")
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


def train(args: argparse.Namespace) -> dict:
    from evaluate import evaluate

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
            record["test_accuracy"] = round(evaluate(model, test_x, test_y, tta=False)["accuracy"], 4)
            model.train()
        history.append(record)
        print(json.dumps(record), flush=True)
        save_atomically(args.checkpoint, lambda path: torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "history": history, "epoch": epoch + 1, "elapsed": elapsed, "args": vars(args),
        }, path))

    hyperparameters = {name: getattr(args, name) for name in HYPERPARAMETERS} | {"limit": args.limit}
    return write_model(model, args.out, data, {"epochs": len(history), "training_seconds": round(elapsed),
                                               "history": history, "hyperparameters": hyperparameters})


def write_model(model: torch.nn.Module, out: Path, data: dict, training: dict) -> dict:
    """Save fp16 weights (half the size, no measurable accuracy change), then describe them in a model card
    beside them: test metrics, calibration and the "none of the ten" statistics, from this data."""
    from evaluate import describe_model

    save_atomically(out, lambda path: torch.save(
        {key: (value.half() if value.is_floating_point() else value).cpu() for key, value in model.state_dict().items()},
        path))
    card = {
        "model": "ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), 11.2M parameters",
        **training,
        "data": data["source"],
        "machine": machine_description(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    return describe_model(out, data, card)


if __name__ == "__main__":
    train(parse_args())
