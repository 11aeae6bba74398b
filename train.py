"""Train the CIFAR-10 ResNet-18 from scratch, reproducibly and resumably, on a CPU or a CUDA GPU.

    python train.py                      # the CPU recipe below; ../shared/data/cifar10-jpeg.tar.gz, else a download
    python train.py --data DIR           # ImageFolder-style train/ and test/, or a torchvision CIFAR-10 root
    python train.py --resume             # carry on from the last end-of-epoch checkpoint
    python train.py --epochs 150 --low-res-epochs 0 --batch-size 512 --lr 0.4   # the shipped model (GPU, 3 min)

Recipe: Nesterov SGD with a warm-up then linear decay to zero, label smoothing, flip + translate + cutout
done with tensor ops on uint8 data held in memory, bf16 autocast + channels_last, and progressive resizing
(the first epochs at 24x24, which costs about half as much per image). Three more, off here: a share of each
batch made to look like a shrunk photo (--photo-augment) or mixed with fractal pictures (--pixmix), and a
moving average of the weights (--ema).
The weights, their model card, the calibration, the "none of the ten" statistics and the numbers on real
photos are written at the end (evaluate.describe_model). bench/recipes.py compares candidate recipes;
fine-tuning on saved corrections is finetune.py.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar10 import CACHE, load_cifar10
from classifier import bf16_supported, build_model, normalize, save_atomically
from fractals import fractal_pictures

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
    photo_augment=0.0,      # share of each batch cropped and recoloured as photos vary (look_like_photos); 0: none
    pixmix=0.0,             # share of each batch mixed with fractal pictures (PixMix, fresh ones each epoch); 0: none
    ema=0.0,                # decay per step of a moving average of the weights, which is then what is evaluated
                            # and saved (0.998: about the last 500 steps; less in the first steps); 0: none
    eval_every=4,           # epochs between test evaluations (without TTA) in the history
    seed=0,
)

FRACTALS_PER_EPOCH = 1000   # new fractal pictures for PixMix each epoch (at most one per training image)
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "models" / "resnet18_cifar10.pt"
DEFAULT_CHECKPOINT = CACHE / "train" / "checkpoint.pt"


# ---------------------------------------------------------------- augmentation

def look_like_photos(images: torch.Tensor, generator: torch.Generator, crop_area: tuple[float, float] = (0.35, 1.0),
                     jitter: float = 0.25) -> torch.Tensor:
    """Float 0..255 images cropped and recoloured at random, as a photo's framing and light vary: a crop of a
    share crop_area of the area, anywhere, at an aspect of 3:4 to 4:3 (narrowed where the crop would not fit),
    resampled bicubically to the input size; then brightness, contrast and saturation each scaled by up to
    +-jitter; rounded to whole levels as the app's input is."""
    n, _, h, w = images.shape
    device = images.device

    def uniform(low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    area = uniform(*crop_area)
    widest = torch.minimum(torch.full_like(area, math.log(4 / 3)), -area.log())  # width = sqrt(area * aspect) <= 1
    log_aspect = uniform(-widest, widest)
    width, height = (area * log_aspect.exp()).sqrt(), (area / log_aspect.exp()).sqrt()
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    x = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    if jitter:
        luma = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
        x = x * uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1)
        mean = (x * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = mean + (x - mean) * uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1)
        gray = (x * luma).sum(dim=1, keepdim=True)
        x = gray + (x - gray) * uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1)
    return x.clamp(0, 255).round()


def mixing_weights(n: int, strength: float, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """PixMix's weights of the image (a) and the picture mixed in (b): half the time a ~ Beta(strength, 1) and
    b ~ Beta(1, strength), a blend that keeps most of the image; else a = 1 + c and b = -c, c ~ Beta(1, strength),
    a push away from the picture. Drawn by inverting the Beta(s, 1) distribution function: u ** (1 / s)."""
    def beta_s_1() -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) ** (1 / strength)

    blend = torch.rand(n, generator=generator, device=device) < 0.5
    a_blend, b_blend, push = beta_s_1(), 1 - beta_s_1(), 1 - beta_s_1()
    a = torch.where(blend, a_blend, 1 + push)
    b = torch.where(blend, b_blend, -push)
    return a.view(n, 1, 1, 1), b.view(n, 1, 1, 1)


def pixmix(images: torch.Tensor, pictures: torch.Tensor, generator: torch.Generator, rounds: int = 4,
           strength: float = 3.0) -> torch.Tensor:
    """PixMix on float 0..255 images: up to `rounds` times (a random number each, possibly none), mix in either
    a random one of the uint8 pictures or the image's own mirror, by adding or by multiplying, with
    mixing_weights; values stay in 0..255."""
    n = len(images)
    device = images.device
    rounds_taken = torch.randint(0, rounds + 1, (n,), generator=generator, device=device)
    mixed = images / 255
    mirrored = mixed.flip(3)
    for round_number in range(rounds):
        picture = pictures[torch.randint(0, len(pictures), (n,), generator=generator, device=device)].float() / 255
        use_picture = (torch.rand(n, generator=generator, device=device) < 0.5).view(n, 1, 1, 1)
        other = torch.where(use_picture, picture, mirrored)
        a, b = mixing_weights(n, strength, generator, device)
        added = (a * (2 * mixed - 1) + b * (2 * other - 1) + 1) / 2
        multiplied = (2 * mixed).clamp_min(1e-6) ** a * (2 * other).clamp_min(1e-6) ** b / 2
        by_adding = (torch.rand(n, generator=generator, device=device) < 0.5).view(n, 1, 1, 1)
        this_round = torch.where(by_adding, added, multiplied).clamp(0, 1)
        mixed = torch.where((round_number < rounds_taken).view(n, 1, 1, 1), this_round, mixed)
    return mixed * 255


def augment(images: torch.Tensor, translate: int, cutout: int, generator: torch.Generator,
            photo_share: float = 0.0, pixmix_share: float = 0.0, pictures: torch.Tensor | None = None) -> torch.Tensor:
    """Make a share of the uint8 batch look like photos and a share mixed with the pictures (PixMix), then
    random mirror, translation (reflect-padded crop) and cutout on all of it; returns normalised floats."""
    n, _, h, w = images.shape
    device = images.device
    images = images.float()
    if photo_share:
        chosen = torch.rand(n, generator=generator, device=device) < photo_share
        images = torch.where(chosen.view(-1, 1, 1, 1), look_like_photos(images, generator), images)
    if pixmix_share:
        chosen = torch.rand(n, generator=generator, device=device) < pixmix_share
        images = torch.where(chosen.view(-1, 1, 1, 1), pixmix(images, pictures, generator), images)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    if translate:
        padded = F.pad(images, (translate,) * 4, mode="reflect")
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


def some_images(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count images chosen at random: the data sets list one class after another, so the first ones are one class."""
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[chosen], labels[chosen]


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Whole batches in an epoch, and at least one: a data set smaller than a batch is one batch."""
    return max(1, images // batch_size)


def average_decay(ema: float, step: int) -> float:
    """The moving average's decay after `step` steps: a short memory at first ((1 + step) / (10 + step)), so
    it soon forgets the random start, then ema."""
    return min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def update_average(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move average's weights and batch-norm statistics a share 1 - decay of the way to model's."""
    pairs = list(zip(average.state_dict().values(), model.state_dict().values()))
    floats = [(averaged, current) for averaged, current in pairs if averaged.is_floating_point()]
    # One fused update of every tensor: a GPU step launches a few kernels, not one per tensor.
    torch._foreach_lerp_([averaged for averaged, _ in floats], [current for _, current in floats], 1 - decay)
    for averaged, current in pairs:
        if not averaged.is_floating_point():
            averaged.copy_(current)  # the batch counters


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
    parser.add_argument("--limit", type=int, default=0, help="train on N images only, chosen at random (smoke tests)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints; 0: none")
    args = check_device(parser, parser.parse_args(argv))
    if not 0 <= args.ema < 1:
        parser.error(f"--ema {args.ema}: the decay must be at least 0 (no average) and below 1")
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every {args.checkpoint_every}: give a number of epochs, or 0 for none")
    if args.resume and not args.checkpoint.is_file():
        parser.error(f"--resume: no checkpoint at {args.checkpoint}; start without --resume (or give --checkpoint)")
    return args


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace, generator: torch.Generator, resolution: int, epoch: int, epochs: int,
                lr_at_step, average: torch.nn.Module | None = None) -> float:
    """One pass over shuffled, augmented batches (images, labels and generator on the model's device), moving
    the average of the weights (if any) after each step; returns the smoothed loss."""
    device = images.device
    use_bf16 = bf16_supported(device)
    steps = steps_per_epoch(len(images), args.batch_size)
    order = torch.randperm(len(images), generator=generator, device=device)
    pictures = fractal_pictures(min(FRACTALS_PER_EPOCH, len(images)), generator) if args.pixmix else None
    started, running_loss = time.time(), torch.zeros((), device=device)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(epoch * steps + step)
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        x = augment(images[index], args.translate, args.cutout, generator, args.photo_augment, args.pixmix, pictures)
        if resolution != x.shape[-1]:
            x = F.interpolate(x, size=resolution, mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            update_average(average, model, average_decay(args.ema, epoch * steps + step))
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
        train_x, train_y = some_images(train_x, train_y, args.limit, args.seed)
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = data["test_x"], data["test_y"]
    print(f"data: {len(train_x)} training and {len(test_x)} test images from {data['source']}", flush=True)

    model = build_model().to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    average = copy.deepcopy(model) if args.ema else None
    kept = model if average is None else average  # what is evaluated and saved
    generator = torch.Generator(device=device).manual_seed(args.seed)
    steps = steps_per_epoch(len(train_x), args.batch_size)
    total_steps = steps * args.epochs
    history, start_epoch, elapsed = [], 0, 0.0
    if args.resume:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        if average is not None:  # a run that had no average starts one from where it is
            average.load_state_dict(checkpoint.get("average") or checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        history, start_epoch, elapsed = checkpoint["history"], checkpoint["epoch"], checkpoint["elapsed"]
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}", flush=True)
    bf16 = bf16_supported(device)
    print(f"{args.epochs} epochs, {steps} steps each on {device}, bf16 autocast {'on' if bf16 else 'off'}",
          flush=True)

    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        resolution = args.low_res if epoch < args.low_res_epochs else 32
        running_loss = train_epoch(model, optimizer, train_x, train_y, args, generator, resolution,
                                   epoch, args.epochs, lambda step: learning_rate(step, total_steps, args.lr, args.warmup),
                                   average)
        seconds = time.time() - started
        elapsed += seconds
        record = {"epoch": epoch + 1, "resolution": resolution, "loss": round(running_loss, 4), "seconds": round(seconds, 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            record["test_accuracy"] = round(evaluate(kept, test_x, test_y, tta=False)["accuracy"], 4)
            kept.train()
        history.append(record)
        print(json.dumps(record), flush=True)
        if args.checkpoint_every and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
            save_atomically(args.checkpoint, lambda path: torch.save({
                "model": model.state_dict(), "average": None if average is None else average.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "history": history, "epoch": epoch + 1, "elapsed": elapsed, "args": vars(args),
            }, path))

    hyperparameters = {name: getattr(args, name) for name in HYPERPARAMETERS} | {"limit": args.limit}
    return write_model(kept, args.out, data, {"epochs": len(history), "training_seconds": round(elapsed),
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
    return describe_model(out, data, card, next(model.parameters()).device)


if __name__ == "__main__":
    train(parse_args())
