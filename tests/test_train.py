"""train.py end to end on a tiny ImageFolder data set made here: it trains, checkpoints, resumes and writes a model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cifar10
import classifier
import finetune
import train
from archives import iter_zip
from classes import CLASSES
from classifier import file_sha256, load_classifier, normalize
from conftest import ROOT


def make_image_folder(root, per_class: int) -> None:
    """Test pictures differ from the training ones (their blue is shifted), so novelty scores are above zero."""
    for shift, split in enumerate(("train", "test")):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(per_class):
                color = (index * 25, 255 - index * 25, (number * 40 + shift * 20) % 256)
                Image.new("RGB", (32, 32), color).save(folder / f"{number}.png")


def test_train_resume_and_model_card(tmp_path):
    make_image_folder(tmp_path / "data", per_class=4)
    common = ["--data", str(tmp_path / "data"), "--batch-size", "8", "--low-res-epochs", "1",
              "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "model.pt")]

    first = train.parse_args(common + ["--epochs", "1"])
    train.train(first)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["history"][0]["resolution"] == 24

    resumed = train.parse_args(common + ["--epochs", "2", "--resume", "--eval-every", "1"])
    card = train.train(resumed)
    assert [record["epoch"] for record in card["history"]] == [1, 2]
    assert card["history"][1]["resolution"] == 32 and "test_accuracy" in card["history"][1]

    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["test_images"] == 40 and set(saved["per_class_accuracy_tta"]) == set(CLASSES)
    assert 0 <= saved["test_accuracy"] <= 1 and saved["epochs"] == 2 and saved["data"]["folder"]
    assert saved["hyperparameters"]["label_smoothing"] == train.HYPERPARAMETERS["label_smoothing"]
    assert saved["weights_sha256"] == file_sha256(tmp_path / "model.pt")
    assert {"ece_before", "ece_after", "parameters"} <= set(saved["calibration"]) and saved["novelty"]["threshold"] > 0
    assert (tmp_path / "model.novelty.pt").is_file() and (tmp_path / "model.reliability.png").is_file()
    assert saved["real_photos"]["photos"] == 164 and 0 <= saved["real_photos"]["right"] <= 164
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(value.dtype == torch.float16 for value in weights.values() if value.is_floating_point())
    prediction = load_classifier(tmp_path / "model.pt").predict([Image.new("RGB", (32, 32))])[0]
    assert prediction.label in CLASSES and prediction.ood_score >= 0


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [train.learning_rate(step, 100, 0.1, 0.2) for step in range(101)]
    assert rates[0] == 0.1 * 0.1 and max(rates) == rates[20] == 0.1
    assert rates[100] == 0.0 and all(a >= b for a, b in zip(rates[20:], rates[21:]))


def random_images(n: int) -> torch.Tensor:
    """Noise pictures: no two shifts or mirrorings of one look alike, so each output says which it was."""
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_augment_mirrors_about_half_the_images():
    images = random_images(64)
    out = train.augment(images, translate=0, cutout=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    plain, mirrored = normalize(images), normalize(images.flip(3))  # left-right: the last axis is the width
    as_is = [torch.equal(out[i], plain[i]) for i in range(64)]
    flipped = [torch.equal(out[i], mirrored[i]) for i in range(64)]
    assert all(a != b for a, b in zip(as_is, flipped))  # each image is itself or its mirror image, nothing else
    assert 16 <= sum(flipped) <= 48


def test_augment_shifts_by_up_to_translate_pixels_and_mirrors():
    """Each output is one window of the reflect-padded image or of its mirror image, numpy's padding as reference."""
    images = random_images(64)
    out = train.augment(images, translate=4, cutout=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    seen = []
    for image, result in zip(images.numpy(), out):
        matches = []
        for mirror in (False, True):
            padded = np.pad(image[:, :, ::-1] if mirror else image, ((0, 0), (4, 4), (4, 4)), mode="reflect")
            for dy in range(9):
                for dx in range(9):
                    window = torch.from_numpy(padded[:, dy:dy + 32, dx:dx + 32].copy())[None]
                    if torch.equal(normalize(window)[0], result):
                        matches.append((mirror, dy, dx))
        assert len(matches) == 1, matches
        seen += matches
    assert 16 <= sum(mirror for mirror, _, _ in seen) <= 48
    assert len({(dy, dx) for _, dy, dx in seen}) > 20  # shifts of every size, not one


def test_finetune_on_an_export_keeps_or_refuses_by_test_accuracy(tmp_path, store_env):
    """The History page's ZIP goes straight into --finetune; the new weights are written only when allowed."""
    from db import NewPrediction, Store
    from conftest import image_bytes
    import hashlib

    make_image_folder(tmp_path / "data", per_class=2)
    store = Store.from_env()
    exported = [image_bytes("PNG", size=(40, 40), color=(30 * i, 200 - 15 * i, 90)) for i in range(6)]
    store.save_predictions([NewPrediction(hashlib.sha256(data).hexdigest(), data, "png", f"{i}.png", "cat", 0.4,
                                          CLASSES[i], "test") for i, data in enumerate(exported)])
    export = tmp_path / "export.zip"
    export.write_bytes(b"".join(iter_zip(store)))
    x, y = finetune.load_export(export)
    assert x.shape == (6, 3, 32, 32) and sorted(y.tolist()) == list(range(6))

    common = [str(export), "--data", str(tmp_path / "data"), "--batch-size", "16", "--epochs", "1", "--mix", "1"]
    refused = tmp_path / "refused.pt"
    assert finetune.finetune(finetune.parse_args(common + ["--out", str(refused), "--max-drop", "-1"])) is None
    assert not refused.exists()

    accepted = tmp_path / "accepted.pt"
    card = finetune.finetune(finetune.parse_args(common + ["--out", str(accepted), "--max-drop", "1"]))
    assert accepted.exists() and card["finetuned_from"].startswith("resnet18_cifar10@") and card["finetune_images"] == 6
    assert load_classifier(accepted).version != load_classifier().version


def test_asking_for_a_missing_gpu_is_a_clear_error():
    """Run where PyTorch really sees no GPU (none made visible to it), so the test runs on every machine."""
    script = ("import train\n"
              "print(train.parse_args([]).device, flush=True)\n"
              "train.parse_args(['--device', 'cuda'])\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.strip() == "cpu", run.stderr  # the default where there is no GPU
    assert run.returncode == 2 and "PyTorch sees no CUDA GPU here" in run.stderr, run.stderr


def test_a_mistyped_data_path_is_an_error_not_a_download(tmp_path, capsys):
    missing = tmp_path / "cifar-10-typo"
    with pytest.raises(SystemExit, match="not a CIFAR-10 archive"):
        cifar10.load_cifar10(str(missing))
    assert not missing.exists()  # nothing was downloaded into it


def test_an_archive_without_train_and_test_is_a_clear_error(tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setattr(train, "CACHE", tmp_path / "cache")
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "pictures" / "a.png")
    with tarfile.open(tmp_path / "pictures.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "pictures", arcname="pictures")
    with pytest.raises(SystemExit, match="has no train/ and test/ folders"):
        cifar10.load_cifar10(str(tmp_path / "pictures.tar.gz"))


def test_a_stray_file_in_a_class_folder_is_skipped_with_a_warning(tmp_path):
    make_image_folder(tmp_path / "data", per_class=1)
    (tmp_path / "data" / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01binary junk")
    (tmp_path / "data" / "train" / "dog" / "notes.txt").write_text("not a picture")
    with pytest.warns(UserWarning) as warned:
        data = cifar10.load_cifar10(str(tmp_path / "data"))
    assert sorted(str(w.message).split("/")[-1].split(":")[0] for w in warned) == [".DS_Store", "notes.txt"]
    assert len(data["train_y"]) == 10 and len(data["test_y"]) == 10


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "--checkpoint", str(tmp_path / "none.pt")])
    assert "no checkpoint at" in capsys.readouterr().err


def test_weights_are_replaced_atomically(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous file as it was."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"the previous weights")

    def dies_half_way(path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        classifier.save_atomically(target, dies_half_way)
    assert target.read_bytes() == b"the previous weights"
