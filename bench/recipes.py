"""Train candidate recipes for the shipped ResNet-18 and compare them on what the model card measures.

    python bench/recipes.py --out DIR                          # the first three recipes below, in order
    python bench/recipes.py --out DIR --only anchor,photos     # others, in the order given
    python bench/recipes.py --out DIR --limit 1000 --epochs 2   # a smoke test on the CPU (too short to learn)

Each recipe is train.py's hyperparameters with a few changed. Its weights, card, novelty bank and PNGs go to
DIR/<recipe>.pt and beside it (evaluate.describe_model, as for the shipped model, on the training device),
and DIR/recipes.md gains its row as it finishes, after the shipped model's (written when the table is new,
so a second run adds to the first). A recipe that fails gets a row saying why, and the next one runs.
Columns: CIFAR-10 test accuracy with flip TTA, calibration error on the held-out half of the test split, and
on the real photos of the ten (../shared/data/real-photos-dev): how many right, calibration error, how many
flagged "none of the ten", and AUROC of that score against ../shared/data/not-cifar10-dev. The photos only
measure: nothing here is fitted to them. Without them, or without the CIFAR-10 data, it refuses to start.

Made for a GPU: an 80-epoch recipe trains in about two minutes on an H100. On the lent GPU machine, copy
../shared/data into the checkout's parent first (it does not travel), put DIR outside $OUT, and bring back
recipes.md, the cards (*.json) and the chosen weights (22 MB: in parts, as a returned file holds 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cifar10 import SHARED_ARCHIVE  # noqa: E402
from classifier import DEFAULT_WEIGHTS  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

# ---------------------------------------------------------------- recipes
# The anchor is Keller Jordan's ResNet-18 baseline (cifar10-airbench): 95.9% in 80 epochs on CIFAR-10 as PNGs.
ANCHOR = dict(epochs=80, low_res_epochs=0, batch_size=500, lr=0.2, label_smoothing=0.0, cutout=12)
DEFAULT_RUN = "anchor,photos-ema,photos-ema-pixmix"  # three 80-epoch runs: one lent GPU's session
RECIPES = {
    "anchor": ANCHOR,
    "photos": ANCHOR | dict(photo_augment=0.5),                        # half of each batch cropped, recoloured
    "photos-ema": ANCHOR | dict(photo_augment=0.5, ema=0.998),         # and the average of the last ~500 steps
    "photos-ema-smoothing": ANCHOR | dict(photo_augment=0.5, ema=0.998, label_smoothing=0.2),
    "photos-ema-pixmix": ANCHOR | dict(photo_augment=0.5, ema=0.998, pixmix=0.5),  # for "none of the ten"
    "photos-ema-200": ANCHOR | dict(photo_augment=0.5, ema=0.998, epochs=200, cutout=16),  # DeVries & Taylor's
}


def row(name: str, card: dict) -> str:
    """One Markdown table row of a model card's numbers."""
    photos = card.get("real_photos", {})
    cells = [
        name,
        str(card.get("epochs", "")),
        f"{card['test_accuracy_tta']:.2%}",
        f"{card['calibration']['ece_after']:.2%}",
        f"{photos['right']} of {photos['photos']}" if photos else "",
        f"{photos['ece']:.1%}" if photos else "",
        str(photos.get("flagged", "")),
        f"{photos['auroc_not_cifar10_vs_these']:.3f}" if "auroc_not_cifar10_vs_these" in photos else "",
        str(card.get("training_seconds", "")),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| recipe | epochs | CIFAR-10 test, flip TTA | ECE, held-out half | real photos right | ECE, real photos "
          "| flagged | AUROC vs not-cifar10-dev | training s |\n|---|---|---|---|---|---|---|---|---|")


def train_flags(name: str, args: argparse.Namespace) -> list[str]:
    """train.py's command line for one recipe."""
    recipe = RECIPES[name] | ({"epochs": args.epochs} if args.epochs else {})
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in recipe.items()]
    flags += ["--eval-every", str(recipe["epochs"]),  # the test split once, at the end: seconds each time saved
              "--out", str(args.out / f"{name}.pt"), "--checkpoint-every", "0", "--limit", str(args.limit)]
    return flags + (["--data", args.data] if args.data else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for each recipe's model and recipes.md")
    parser.add_argument("--only", default=DEFAULT_RUN, help=f"comma-separated recipe names, in the order run "
                                                             f"(the recipes: {', '.join(RECIPES)})")
    parser.add_argument("--data", help="as train.py's --data")
    parser.add_argument("--limit", type=int, default=0, help="as train.py's --limit (smoke tests)")
    parser.add_argument("--epochs", type=int, default=0, help="override every recipe's epochs (smoke tests)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only.split(",") if name not in RECIPES]
    if unknown:
        parser.error(f"--only: no recipe named {', '.join(unknown)}; the recipes are {', '.join(RECIPES)}")
    missing = [f"{folder} (no photos)" for folder in (evaluate.REAL_PHOTOS, evaluate.NOT_CIFAR10)
               if not any(folder.glob("*/*"))]
    if args.data is None and not SHARED_ARCHIVE.is_file():
        missing.append(f"{SHARED_ARCHIVE} (or give --data)")
    if missing:
        parser.error("the recipes are measured on data that is not here: " + "; ".join(missing))
    if not torch.cuda.is_available() and not args.limit:
        parser.error("PyTorch sees no CUDA GPU here, and one recipe would take days on a CPU: "
                     "give --limit (and --epochs) for a smoke test")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "recipes.md"
    if not table.is_file():
        shipped = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
        table.write_text(f"{HEADER}\n{row('shipped', shipped)}\n")
    for name in args.only.split(","):
        flags = train_flags(name, args)
        print(f"== {name}: {' '.join(flags)}", flush=True)
        try:
            line = row(name, train.train(train.parse_args(flags)))
        except Exception as error:  # one recipe's failure must not cost the others their turn on the GPU
            traceback.print_exc()
            why = " ".join(f"{error.__class__.__name__}: {error}".split()).replace("|", "/")  # one table row
            line = f"| {name} | failed: {why} |" + " |" * 7
        with table.open("a") as handle:
            handle.write(line + "\n")
    print(table.read_text(), flush=True)


if __name__ == "__main__":
    main()
