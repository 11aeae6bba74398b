"""Fine-tune the model in use on the feedback people saved, guarded, and keep the result as a new model version.

    python finetune.py --from-store        # on any machine that reaches the store (the same settings as the app)

The Model page's "Improve the model" starts this same job (in a process of its own, `--job ID`). In order:
1. the feedback: every saved record under its final label; one in five (chosen by content hash, the same every
   time) is held out and never trained on;
2. the features: the model in use reads the training feedback, CIFAR-10 training images (500 per class, the
   novelty bank's) and the CIFAR-10 test split, each flip-averaged as the app reads an upload;
3. the recipe: only the final layer learns, from those features, with the feedback given a fixed share of the
   weight and a pull back towards the old layer, so it fits the photos people upload without forgetting
   CIFAR-10; the rest of the network is left as it is (so the novelty bank still fits it);
4. the description: calibration and the "none of the ten" threshold fitted again, on half the test split and on
   the held-out feedback (data like what people upload);
5. the guard: the candidate replaces the model in use only if it gets more of the held-out feedback right and
   loses at most 0.3 points of CIFAR-10 test accuracy (flip TTA); otherwise it is kept as a rejected version.
Each step beats into the store (progress, time left), so every server's Model page shows it; Cancel, or a job
that stops beating, keeps nothing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time

import torch
from torch import nn

from classes import CLASSES
from classifier import Classifier, Novelty, load_version, save_atomically, to_uint8_batch
from evaluate import FLAGGED_SHARE
from train import machine_description

# ---------------------------------------------------------------- hyperparameters (measured: docs/learning.md)
HYPERPARAMETERS = dict(
    steps=300,             # full-batch steps of the final layer, on features computed once
    lr=0.5,                # SGD with momentum 0.9, decayed linearly to zero
    feedback_share=0.2,    # of the loss: the training feedback's share, the rest CIFAR-10's
    pull_back=1e-3,        # L2 towards the old final layer: what it learnt from 50,000 images stays
    held_out_every=5,      # one record in five, by content hash, is held out
    max_drop=0.003,        # the largest drop in CIFAR-10 test accuracy (flip TTA) a promotion may cost
    calibration_share=0.5,  # the held-out feedback's weight when calibration is fitted (the rest: CIFAR-10)
    flagged_share=FLAGGED_SHARE,  # "none of the ten" flags at most this share of the test split and of the feedback
    seed=0,
)
# Where the CIFAR-10 images are, for a job the Model page starts (it passes no flags).
DATA_ENV = "CIFAR10_TRAINING_DATA"
BEAT_S = 2.0  # how often the job tells the store it is alive (and learns whether it was cancelled)
# How much of the job each step is, for the progress bar and the time left.
STEPS = {"feedback": 0.15, "features": 0.6, "training": 0.05, "description": 0.2}


class Cancelled(Exception):
    """Cancel was pressed (or the job was failed as silent): stop, keep nothing."""


def held_out(content_hash: str, every: int = HYPERPARAMETERS["held_out_every"]) -> bool:
    """Whether a saved record is held-out feedback: never trained on, only measured. By content hash, so the same
    picture is held out in every job, whoever saved it and whenever."""
    return int(content_hash[:8], 16) % every == 0


class Beat:
    """The job's progress: a thread of its own tells the store every BEAT_S seconds that the job is alive and how
    far it is, whatever the job is busy with (decoding CIFAR-10 takes minutes on a new machine), and learns whether
    it is to stop; the job raises Cancelled at its next step. A store that fails a beat is tried again at the next;
    only silence past versions.JOB_SILENT_S fails the job. Without a job (a test), it only prints."""

    def __init__(self, store, job_id: int | None) -> None:
        self.store, self.job_id = store, job_id
        self.started = time.monotonic()
        self.done = 0.0  # share of the job before the current step
        self.step, self.message, self.progress = "feedback", "starting", 0.0
        self.printed = 0.0
        self.stopping = threading.Event()  # Cancel was pressed, or the job was failed as silent
        self.finished = threading.Event()
        if job_id is not None:
            threading.Thread(target=self._beat_until_finished, name="job-beat", daemon=True).start()

    def _beat_until_finished(self) -> None:
        from records import StoreError
        from versions import beat

        while not self.finished.wait(BEAT_S):
            try:
                if beat(self.store, self.job_id, self.progress, self.seconds_left(), self.message):
                    self.stopping.set()
            except StoreError as error:
                print(f"the store missed a beat ({error}); trying again", file=sys.stderr, flush=True)

    def seconds_left(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return elapsed * (1 - self.progress) / self.progress if self.progress > 0.02 else None

    def enter(self, step: str, message: str) -> None:
        order = list(STEPS)
        self.done = sum(STEPS[name] for name in order[:order.index(step)])
        self.step, self.message = step, message
        self(0.0)

    def part(self, start: float, end: float):
        """A beat for a part of the current step, from `start` to `end` of it."""
        return lambda within: self(start + (end - start) * within)

    def __call__(self, within: float) -> None:
        """`within`: how far the current step is (0..1). Raises Cancelled once the job is to stop."""
        if self.stopping.is_set():
            raise Cancelled
        self.progress = min(0.99, self.done + STEPS[self.step] * within)
        if time.monotonic() - self.printed >= BEAT_S:  # the command line's progress
            self.printed = time.monotonic()
            print(f"{self.progress:4.0%} {self.message}", flush=True)


def flip_features(classifier: Classifier, images: torch.Tensor, beat: Beat, chunk: int = 256) -> torch.Tensor:
    """Penultimate features of each image and its mirror, (2, N, 512): their mean is what the app's flip TTA
    reads, and the final layer is linear, so the logits of any final layer follow from them."""
    parts = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk]
        parts.append(torch.stack([classifier.outputs(batch, tta=False)[1],
                                  classifier.outputs(batch.flip(3), tta=False)[1]]))
        beat((start + len(batch)) / max(1, len(images)))
    return torch.cat(parts, dim=1) if parts else torch.empty((2, 0, classifier.model.fc.in_features))


def backbone_digest(model: nn.Module) -> str:
    """What the features depend on: every weight but the final layer's (which is all a job changes)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        if not name.startswith("fc."):
            digest.update(name.encode())
            digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def reference_features(classifier: Classifier, data: dict, train_indices: torch.Tensor, beat) -> torch.Tensor:
    """flip_features of these CIFAR-10 training images and of the whole test split, in that order: computed once
    per backbone and data set on this machine, then read from .cache/ (every job changes only the final layer, so
    the next job's features are these; most of a first job's time is spent here)."""
    from cifar10 import CACHE

    key = hashlib.sha256(json.dumps([backbone_digest(classifier.model), data["source"].get("archive_sha256"),
                                     train_indices.tolist()]).encode()).hexdigest()[:24]
    path = CACHE / "finetune" / f"features-{key}.pt"
    if "archive_sha256" in data["source"] and path.is_file():  # a folder's content may change under its name
        beat(1.0)
        return torch.load(path, weights_only=True).float()
    features = flip_features(classifier, torch.cat([data["train_x"][train_indices], data["test_x"]]), beat).half()
    if "archive_sha256" in data["source"]:
        save_atomically(path, lambda partial: torch.save(features, partial))
    return features.float()  # fp16 whether computed or read: every job sees the same numbers


def train_final_layer(old: nn.Linear, features: torch.Tensor, labels: torch.Tensor, feedback: torch.Tensor,
                      args: argparse.Namespace, beat: Beat) -> nn.Linear:
    """The final layer fitted to flip-averaged features: the feedback (mask `feedback`) weighs args.feedback_share
    of the loss, CIFAR-10 the rest, and an L2 pull keeps it near the old layer. Rounded to fp16, as it is stored."""
    layer = nn.Linear(old.in_features, old.out_features)
    layer.load_state_dict(old.state_dict())
    weights = torch.where(feedback, args.feedback_share / max(1, int(feedback.sum())),
                          (1 - args.feedback_share) / max(1, int((~feedback).sum())))
    if not feedback.any():
        weights = torch.full_like(weights, 1 / len(weights))
    optimizer = torch.optim.SGD(layer.parameters(), lr=args.lr, momentum=0.9)
    old_weight, old_bias = old.weight.detach().clone(), old.bias.detach().clone()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - step / args.steps)
        loss = (nn.functional.cross_entropy(layer(features), labels, reduction="none") * weights).sum()
        loss = loss + args.pull_back * ((layer.weight - old_weight).pow(2).sum() + (layer.bias - old_bias).pow(2).sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        beat((step + 1) / args.steps)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(parameter.half().float())
    return layer


def feedback_images(store, records: list, beat: Beat) -> tuple[torch.Tensor, torch.Tensor, list, list[str]]:
    """The saved pictures read as the app reads an upload, their final labels and records; a picture whose image
    is missing or unreadable is left out (and said why), the rest go on."""
    from inputs import load_image
    from records import StoreError

    images, labels, read, left_out = [], [], [], []
    for index, record in enumerate(records):
        try:
            images.append(to_uint8_batch([load_image(store.image_bytes(record), record.source)]))
        except (StoreError, ValueError) as error:
            left_out.append(f"{record.source!r}: {error}")
        else:
            labels.append(CLASSES.index(record.final_label))
            read.append(record)
        beat((index + 1) / max(1, len(records)))
    if not images:
        return torch.empty((0, 3, 32, 32), dtype=torch.uint8), torch.empty(0, dtype=torch.long), read, left_out
    return torch.cat(images), torch.tensor(labels), read, left_out


def right(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) == labels).sum())


def state_bytes(model: nn.Module) -> bytes:
    """fp16 weights, as train.py writes them (half the size, no measurable accuracy change)."""
    buffer = io.BytesIO()
    torch.save({key: (value.half() if value.is_floating_point() else value).cpu()
                for key, value in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def run_job(store, job_id: int | None, args: argparse.Namespace, started_by: str) -> str:
    """Fine-tune the active version on the store's feedback, describe and guard the candidate, keep it as a new
    version (active if it passed). Returns how the job ended, in a sentence."""
    beat = Beat(store, job_id)
    try:
        return guarded_version(store, beat, args, started_by)
    finally:
        beat.finished.set()


def guarded_version(store, beat: Beat, args: argparse.Namespace, started_by: str) -> str:
    """run_job's work, beating into `beat`."""
    from cifar10 import load_cifar10
    from evaluate import (CALIBRATION_SEED, accuracy_report, bank_indices, calibration_halves,
                          expected_calibration_error, fit_calibration, low_confidence_threshold)
    from versions import PROMOTED, REJECTED, active_version, active_version_id, add_version, version_files

    job_id = beat.job_id
    started = time.monotonic()
    torch.manual_seed(args.seed)
    base_version = active_version(store)
    files = version_files(store, base_version)  # read (and checked) once
    base = load_version(store, base_version, files)
    _, base_card, bank_bytes = files

    # 1. the feedback, one in five held out
    beat.enter("feedback", f"reading the saved pictures ({base_version.name} in use)")
    records = [record for record in store.iter_records() if record.final_label in CLASSES]
    x, y, read, left_out = feedback_images(store, records, beat)
    held = torch.tensor([held_out(record.content_hash, args.held_out_every) for record in read], dtype=torch.bool)
    for note in left_out:
        print(f"left out {note}", flush=True)

    # 2. the features, computed once: only the final layer learns
    beat.enter("features", f"reading {len(read)} saved pictures and CIFAR-10 through {base_version.name}")
    data = load_cifar10(args.data)
    cifar = bank_indices(data["train_y"])
    features = torch.cat([flip_features(base, x, beat.part(0.0, 0.1)),
                          reference_features(base, data, cifar, beat.part(0.1, 1.0))], dim=1)
    pooled = features.mean(dim=0)  # what the app's flip TTA reads
    feedback_features, cifar_features = pooled[:len(y)], pooled[len(y):len(y) + len(cifar)]
    test_features, test_plain, test_y = pooled[len(y) + len(cifar):], features[0, len(y) + len(cifar):], data["test_y"]

    # 3. the recipe
    beat.enter("training", f"fitting the final layer to {int((~held).sum())} saved pictures ({int(held.sum())} "
                           f"held out) and {len(cifar)} CIFAR-10 images")
    trained = torch.cat([torch.ones(int((~held).sum()), dtype=torch.bool), torch.zeros(len(cifar), dtype=torch.bool)])
    layer = train_final_layer(base.model.fc, torch.cat([feedback_features[~held], cifar_features]),
                              torch.cat([y[~held], data["train_y"][cifar]]), trained, args, beat)

    # 4. the description, and 5. the guard
    beat.enter("description", "calibration, \"none of the ten\" and the guard")
    with torch.no_grad():
        old_test, new_test, new_plain = base.model.fc(test_features), layer(test_features), layer(test_plain)
        old_held, new_held = base.model.fc(feedback_features[held]), layer(feedback_features[held])
    held_y = y[held]
    old_accuracy, new_accuracy = right(old_test, test_y) / len(test_y), right(new_test, test_y) / len(test_y)
    old_right, new_right = right(old_held, held_y), right(new_held, held_y)
    promoted = new_right > old_right and new_accuracy >= old_accuracy - args.max_drop

    fit_half, measure_half = calibration_halves(len(test_y))
    share = args.calibration_share if len(held_y) else 0.0
    calibration = fit_calibration(
        torch.cat([new_test[fit_half], new_held]), torch.cat([test_y[fit_half], held_y]),
        torch.cat([torch.full((len(fit_half),), (1 - share) / len(fit_half)),
                   torch.full((len(held_y),), share / max(1, len(held_y)))]))
    novelty = Novelty(base.novelty.bank, 0.0)
    test_scores, held_scores = novelty.scores(test_features), novelty.scores(feedback_features[held])
    threshold = torch.quantile(test_scores, 1 - args.flagged_share).item()
    if len(held_scores):  # photos score higher than CIFAR-10 thumbnails: at most the same share of them is flagged
        threshold = max(threshold, torch.quantile(held_scores, 1 - args.flagged_share).item())
    after = calibration.probabilities(new_test[measure_half])
    beat(0.5)

    base.model.fc = layer
    weights = state_bytes(base.model)
    candidate = Classifier(base.model, "candidate", calibration=calibration, novelty=Novelty(novelty.bank, threshold))
    card = {key: value for key, value in base_card.items() if key not in ("real_photos", "history", "finetune")}
    card |= {
        "date": datetime.date.today().isoformat(), "machine": machine_description(), "torch": torch.__version__,
        **real_photos_card(candidate, {record.content_hash for record in records}),
        "test_accuracy": round(right(new_plain, test_y) / len(test_y), 4),
        "test_accuracy_tta": round(new_accuracy, 4),
        "per_class_accuracy_tta": {name: round(value, 4) for name, value in
                                   accuracy_report(new_test.argmax(dim=1), test_y)["per_class_accuracy"].items()},
        "test_images": len(test_y),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "calibration": {
            **base_card.get("calibration", {}),
            "parameters": {"a": calibration.a, "b": calibration.b, "c": calibration.c, "s_range": calibration.s_range},
            "fitted_on": f"{len(fit_half)} test images (seed {CALIBRATION_SEED}) and {len(held_y)} held-out saved "
                         f"pictures, weighing {share:.0%}; measured on the other {len(measure_half)} test images",
            "ece_after": round(expected_calibration_error(after, test_y[measure_half]), 4),
            "mean_confidence_after": round(after.max(dim=1).values.mean().item(), 4),
        },
        "low_confidence_threshold": low_confidence_threshold(after, test_y[measure_half]),
        "novelty": {**base_card.get("novelty", {}), "threshold": round(threshold, 6),
                    "test_flagged": round((test_scores > threshold).float().mean().item(), 4)},
        "finetune": {
            "from_version": base_version.id, "started_by": started_by, "records": len(records),
            "trained_on": int((~held).sum()), "held_out": len(held_y), "left_out": len(left_out),
            "held_out_right": {"before": old_right, "after": new_right},
            "test_accuracy_tta": {"before": round(old_accuracy, 4), "after": round(new_accuracy, 4)},
            "promoted": promoted,
            "hyperparameters": {name: getattr(args, name) for name in HYPERPARAMETERS},
            "seconds": round(time.monotonic() - started),
        },
    }
    verdict = (f"{new_right} of {len(held_y)} held-out saved pictures right (before: {old_right}); CIFAR-10 test "
               f"{new_accuracy:.2%} with flip TTA (before: {old_accuracy:.2%})")

    def ending(version_id: int, in_use: bool) -> str:
        if in_use:
            return f"version {version_id} is in use: {verdict}."
        if promoted:
            return (f"version {version_id} passed the guard but is not in use: another version was made active while "
                    f"the job ran (Use this version makes it the one in use). {verdict}.")
        return f"version {version_id} was kept as rejected and {base_version.name} stays in use: {verdict}."

    beat(0.9)
    version = add_version(store, weights, card, bank_bytes, PROMOTED if promoted else REJECTED,
                          made_from=base_version.id, created_by=started_by, activate=promoted,
                          records_seen=len(records), job=None if job_id is None else (job_id, ending))
    return ending(version.id, active_version_id(store) == version.id)


def real_photos_card(candidate: Classifier, saved: set[str]) -> dict:
    """The candidate on the real photos of the ten (evaluate.real_photos_report, as a trained model's card has it),
    where the folder is on this machine and none of its photos is saved feedback (which the candidate may have
    trained on); else nothing."""
    from evaluate import REAL_PHOTOS, not_cifar10_photos, real_photos_report

    photos = [path for path in REAL_PHOTOS.glob("*/*") if path.is_file()] if REAL_PHOTOS.is_dir() else []
    if not photos or any(hashlib.sha256(path.read_bytes()).hexdigest() in saved for path in photos):
        return {}
    report = real_photos_report(candidate, not_cifar10_photos(), REAL_PHOTOS)
    return {"real_photos": report} if report is not None else {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-store", action="store_true", required=True,
                        help="fine-tune on the feedback in the configured store (the app's environment settings)")
    parser.add_argument("--data", default=os.environ.get(DATA_ENV) or None,
                        help=f"CIFAR-10 archive, ImageFolder train/test folder, or torchvision root (default: "
                             f"{DATA_ENV}, else ../shared/data/cifar10-jpeg.tar.gz)")
    parser.add_argument("--job", type=int, help="the job the Model page opened (it starts this process)")
    parser.add_argument("--started-by", default="", help=argparse.SUPPRESS)
    for name, default in HYPERPARAMETERS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return parser.parse_args(argv)


def job_threads() -> int:
    """Fewer threads than the server's (one per core): the pages stay responsive while a job runs."""
    return max(1, (os.cpu_count() or 2) // 2)


def main(argv: list[str] | None = None) -> int:
    """Run one job: the one the page opened (--job), or a new one (refused while another runs anywhere)."""
    from records import StoreError
    from store import Store
    from versions import JobStopped, end_job, start_job

    args = parse_args(argv)
    os.nice(10)  # below the servers on the same machine
    torch.set_num_threads(job_threads())
    try:
        store = Store.from_env()
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        if args.job is None:
            try:
                job_id = start_job(store, args.started_by).id
            except StoreError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        else:
            job_id = args.job
        try:
            print(run_job(store, job_id, args, args.started_by), flush=True)
            return 0
        except (Cancelled, JobStopped):
            end_job(store, job_id, "cancelled", "cancelled; nothing was kept.")
            print("cancelled: nothing was kept.", file=sys.stderr)
            return 1
        except BaseException as error:
            logging.getLogger(__name__).exception("the fine-tuning job failed")
            reason = " ".join(str(error).split()) or type(error).__name__
            end_job(store, job_id, "failed", f"failed: {reason}. Nothing was kept; it can be started again.")
            return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
