"""Benchmark: does the app learn from saved feedback, and what does a fine-tuning job cost?

    python bench/learning.py                     # 5-fold cross-validation on ../shared/data/real-photos-dev
    python bench/learning.py --records 1000      # the job's time on 1,000 saved records

Cross-validation (the default): the photos are split in five folds by content hash; for each fold, a new store
(SQLite + a folder, in a temporary folder) imports the other four as saved feedback (`python db.py import` of an
ImageFolder ZIP, their folders as final labels), runs the same job the Model page starts (`python finetune.py
--from-store`), and the model the store then has active classifies the fold, through Classifier.predict as the
app does: right before and after, calibration error before and after (on every photo, each predicted by the model
of the fold it was held out from), CIFAR-10 test accuracy before and after (the job's own measurement), and
whether the guard promoted the candidate. Nothing made here is kept: the photos may be imported into a store for
this measurement only (their README says so).

--switches N: a server's resident memory as it follows N switches of the active version.

--records N: a store with N saved records (copies of the real photos, each cropped a little so that each is a new
picture, as large as a real upload), then one job, timed from start to end. Run `python bench/page.py --only keys`
while it runs for the key latency beside a job. Prints numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from classes import CLASSES  # noqa: E402
from classifier import load_classifier, load_version  # noqa: E402
from evaluate import REAL_PHOTOS, expected_calibration_error  # noqa: E402
from inputs import load_image  # noqa: E402

STORE_VARIABLES = ("CIFAR10_DB_PATH", "CIFAR10_IMAGE_DIR", "CIFAR10_DATABASE_URL", "CIFAR10_IMAGE_STORE")


def photos(folder: Path) -> list[tuple[str, str, bytes]]:
    """(class, file name, bytes) of every photo in folder/<class>/."""
    return [(path.parent.name, path.name, path.read_bytes()) for path in sorted(folder.glob("*/*"))
            if path.parent.name in CLASSES and path.is_file() and not path.name.startswith(".")]


def fold_of(data: bytes, folds: int) -> int:
    """By content hash, and by other digits than the job's held-out share, so the two splits are independent."""
    return int(hashlib.sha256(data).hexdigest()[8:16], 16) % folds


def image_folder_zip(members: list[tuple[str, str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for label, name, data in members:
            archive.writestr(f"{label}/{name}", data)
    return buffer.getvalue()


def store_env(folder: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in STORE_VARIABLES}
    return env | {"CIFAR10_DB_PATH": str(folder / "feedback.db"), "CIFAR10_IMAGE_DIR": str(folder / "images")}


def run(command: list[str], env: dict[str, str]) -> float:
    """Run a command of the project as a person would; returns its seconds."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def what_the_store_made(env: dict[str, str]):
    """The version the store at env has active, loaded as the app loads it, and the last version it keeps (the
    job's candidate, promoted or rejected)."""
    from store import Store
    from versions import active_version, versions

    saved = {key: os.environ.get(key) for key in STORE_VARIABLES}
    os.environ.update({key: env[key] for key in STORE_VARIABLES if key in env})
    store = Store.from_env()
    try:
        return load_version(store, active_version(store)), versions(store)[-1]
    finally:
        store.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cross_validation(args: argparse.Namespace) -> None:
    everything = photos(args.photos)
    labels = torch.tensor([CLASSES.index(label) for label, _, _ in everything])
    images = [load_image(data, name) for _, name, data in everything]
    folds = torch.tensor([fold_of(data, args.folds) for _, _, data in everything])
    shipped = load_classifier()
    before = torch.tensor([prediction.probabilities for prediction in shipped.predict(images)])
    after = torch.zeros_like(before)
    print(f"{len(everything)} photos, {args.folds} folds; shipped model {shipped.version}", flush=True)
    print("| fold | photos | right before | right after | CIFAR-10 before | after | candidate | job s |")
    print("|---|---|---|---|---|---|---|---|")
    for fold in range(args.folds):
        held = folds == fold
        with tempfile.TemporaryDirectory(prefix="cifar10-learning-") as folder:
            env = store_env(Path(folder))
            archive = Path(folder) / "feedback.zip"
            archive.write_bytes(image_folder_zip([photo for photo, out in zip(everything, held) if not out]))
            run(["db.py", "import", str(archive)], env)
            seconds = run(["finetune.py", "--from-store", *(["--data", args.data] if args.data else [])], env)
            model, candidate = what_the_store_made(env)
            fold_images = [image for image, out in zip(images, held) if out]
            after[held] = torch.tensor([prediction.probabilities for prediction in model.predict(fold_images)])
        tuned = candidate.card["finetune"]["test_accuracy_tta"]
        right_before = int((before[held].argmax(dim=1) == labels[held]).sum())
        right_after = int((after[held].argmax(dim=1) == labels[held]).sum())
        print(f"| {fold} | {int(held.sum())} | {right_before} | {right_after} | {tuned['before']:.2%} | "
              f"{tuned['after']:.2%} | {candidate.status} | {seconds:.0f} |", flush=True)
    right_before = int((before.argmax(dim=1) == labels).sum())
    right_after = int((after.argmax(dim=1) == labels).sum())
    print(f"\nall folds: {right_before} -> {right_after} of {len(labels)} right; calibration error on real photos "
          f"{expected_calibration_error(before, labels):.1%} -> {expected_calibration_error(after, labels):.1%}")


def cropped_copies(everything: list[tuple[str, str, bytes]], count: int) -> list[tuple[str, str, bytes]]:
    """count pictures from the photos, each cropped by a few pixels more than the last copy of its photo: each a
    new picture (its own hash), as large as a real upload."""
    copies = []
    for index in range(count):
        label, name, data = everything[index % len(everything)]
        trim = 1 + index // len(everything)
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            buffer = io.BytesIO()
            image.crop((trim, trim, image.width - trim, image.height - trim)).save(buffer, "JPEG", quality=90)
        copies.append((label, f"{index}-{name}", buffer.getvalue()))
    return copies


def job_time(args: argparse.Namespace) -> None:
    copies = cropped_copies(photos(args.photos), args.records)
    with tempfile.TemporaryDirectory(prefix="cifar10-learning-") as folder:
        env = store_env(Path(folder))
        archive = Path(folder) / "feedback.zip"
        archive.write_bytes(image_folder_zip(copies))
        run(["db.py", "import", str(archive)], env)
        seconds = run(["finetune.py", "--from-store", *(["--data", args.data] if args.data else [])], env)
        _, candidate = what_the_store_made(env)
    print(f"{args.records} saved records: the job took {seconds:.0f} s ({seconds / 60:.1f} min), guard and "
          f"description included; its candidate was {candidate.status}.")


def switch_memory(args: argparse.Namespace) -> None:
    """A server's resident memory as it follows the store from version to version: each switch loads the new
    version (one model more, for a moment) and lets the old one go."""
    from store import Store
    from versions import PROMOTED, ActiveModel, activate, add_version, shipped_files

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # as app.tune_memory sets it on a server: big blocks go back
    weights, card, bank = shipped_files()
    with tempfile.TemporaryDirectory(prefix="cifar10-learning-") as folder:
        os.environ.update({key: value for key, value in store_env(Path(folder)).items() if key in STORE_VARIABLES})
        store = Store.from_env()
        served = ActiveModel(load_version, check_s=0)
        served.get(store)
        print(f"version 1 served: {resident_mb():.0f} MB resident", flush=True)
        for switch in range(args.switches):
            made = add_version(store, weights, card | {"switch": switch}, bank, PROMOTED, 1, "", activate=False)
            activate(store, made.id)
            served.get(store)
            print(f"switched to version {made.id}: {resident_mb():.0f} MB resident", flush=True)
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=REAL_PHOTOS, help="photos in <class>/ folders")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--records", type=int, default=0, help="time one job on this many saved records instead")
    parser.add_argument("--data", help="the CIFAR-10 data the job reads (its default: the shared archive)")
    parser.add_argument("--switches", type=int, default=0, help="measure a server's memory over this many switches")
    args = parser.parse_args()
    if args.switches:
        return switch_memory(args)
    if not photos(args.photos):
        raise SystemExit(f"no photos in {args.photos}/<class>/")
    (job_time if args.records else cross_validation)(args)


if __name__ == "__main__":
    main()
