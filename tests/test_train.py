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
import evaluate
import train
from classes import CLASSES
from classifier import file_sha256, load_classifier, normalize
from conftest import ROOT, cannot_run


def make_image_folder(root, per_class: int) -> None:
    """Test pictures differ from the training ones (their blue is shifted), so novelty scores are above zero."""
    for shift, split in enumerate(("train", "test")):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(per_class):
                color = (index * 25, 255 - index * 25, (number * 40 + shift * 20) % 256)
                Image.new("RGB", (32, 32), color).save(folder / f"{number}.png")


@pytest.fixture
def tiny_photo_set(tmp_path, monkeypatch):
    """The made-up test split stands in for the real photos of the ten, which take seconds per model card."""
    make_image_folder(tmp_path / "data", per_class=2)
    monkeypatch.setattr(evaluate, "REAL_PHOTOS", tmp_path / "data" / "test")


def test_train_resume_and_model_card(tmp_path, tiny_photo_set):
    common = ["--data", str(tmp_path / "data"), "--batch-size", "8", "--low-res-epochs", "1", "--ema", "0.9",
              "--photo-augment", "0.5", "--pixmix", "0.5",
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
    assert saved["test_images"] == 20 and set(saved["per_class_accuracy_tta"]) == set(CLASSES)
    assert 0 <= saved["test_accuracy"] <= 1 and saved["epochs"] == 2 and saved["data"]["folder"]
    assert saved["hyperparameters"]["label_smoothing"] == train.HYPERPARAMETERS["label_smoothing"]
    assert saved["weights_sha256"] == file_sha256(tmp_path / "model.pt")
    assert {"ece_before", "ece_after", "parameters"} <= set(saved["calibration"]) and saved["novelty"]["threshold"] > 0
    assert (tmp_path / "model.novelty.pt").is_file() and (tmp_path / "model.reliability.png").is_file()
    assert saved["real_photos"]["photos"] == 20 and 0 <= saved["real_photos"]["right"] <= 20
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(value.dtype == torch.float16 for value in weights.values() if value.is_floating_point())
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    average, trained = checkpoint["average"], checkpoint["model"]
    assert all(torch.equal(weights[name], value.half()) for name, value in average.items())  # the average is saved
    torch.manual_seed(0)
    initial = classifier.build_model().state_dict()  # what train.py starts from with --seed 0
    moved = [name for name, value in average.items() if value.is_floating_point() and "weight" in name]
    assert all(not torch.equal(average[name], initial[name]) and not torch.equal(average[name], trained[name])
               for name in moved)  # the average followed the training, a step behind

    def distance(a, b):
        return sum(((a[name] - b[name]) ** 2).sum() for name in moved).sqrt()
    assert distance(average, trained) < distance(average, initial)  # and forgot the random start at once
    assert saved["hyperparameters"]["ema"] == 0.9 and saved["hyperparameters"]["photo_augment"] == 0.5
    assert saved["hyperparameters"]["pixmix"] == 0.5
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


def test_a_limited_run_trains_on_every_class_not_the_first_one():
    labels = torch.arange(10).repeat_interleave(500)  # as the archives list them: one class after another
    images = torch.arange(5000).view(-1, 1, 1, 1).expand(5000, 3, 2, 2)
    some_x, some_y = train.some_images(images, labels, 1000, seed=0)
    assert len(some_y) == 1000 and torch.equal(labels[some_x[:, 0, 0, 0]], some_y)
    assert torch.bincount(some_y, minlength=10).min() > 60 and len(set(some_x[:, 0, 0, 0].tolist())) == 1000


def test_the_average_of_the_weights_moves_a_share_of_the_way_and_copies_the_counters():
    model, average = classifier.build_model(), classifier.build_model()
    with torch.no_grad():
        for value in model.state_dict().values():
            value.fill_(3 if value.is_floating_point() else 7)
        for value in average.state_dict().values():
            value.fill_(1 if value.is_floating_point() else 0)
    train.update_average(average, model, decay=0.75)
    for name, value in average.state_dict().items():
        expected = 1.5 if value.is_floating_point() else 7  # 1 + (3 - 1) / 4
        assert torch.all(value == expected), name


def test_the_average_forgets_the_random_start_within_the_first_steps():
    decays = [train.average_decay(0.998, step) for step in range(5000)]
    assert decays[0] == 0.1 and all(a <= b for a, b in zip(decays, decays[1:])) and decays[-1] == 0.998
    left_of_start = torch.tensor(decays[:100]).prod().item()  # the initial weights' share after 100 steps
    assert left_of_start < 1e-6


def ramps(n: int) -> torch.Tensor:
    """Pictures whose red grows 7 levels a pixel to the right and green 7 a pixel downwards: a crop to a share
    of the width or height flattens that slope to the same share."""
    steps = torch.arange(32).float() * 7 + 16
    return torch.stack([steps.view(1, 32).expand(32, 32), steps.view(32, 1).expand(32, 32),
                        torch.full((32, 32), 128.0)]).expand(n, 3, 32, 32).clone()


def test_look_like_photos_crops_a_share_of_the_area_at_an_aspect_near_one_anywhere():
    out = train.look_like_photos(ramps(300), torch.Generator().manual_seed(0), crop_area=(0.35, 1.0), jitter=0)
    assert out.shape == (300, 3, 32, 32) and torch.equal(out, out.round())
    width = (out[:, 0, 4:28, 28] - out[:, 0, 4:28, 4]).mean(dim=1) / 24 / 7  # the share of the width kept
    height = (out[:, 1, 28, 4:28] - out[:, 1, 4, 4:28]).mean(dim=1) / 24 / 7
    area, aspect = width * height, width / height
    assert abs(area.mean() - (0.35 + 1) / 2) < 0.03  # the area asked for, kept where the crop meets the edge
    assert area.min() > 0.35 - 0.02 and area.max() < 1 + 0.02, (area.min(), area.max())
    assert aspect.min() > 3 / 4 - 0.03 and aspect.max() < 4 / 3 + 0.03, (aspect.min(), aspect.max())
    assert area.quantile(0.1) < 0.45 and area.quantile(0.9) > 0.85  # crops of every size, not one
    centres = out[:, 0, 16, 16]
    assert centres.max() - centres.min() > 60  # crops from left and right, not the middle only
    assert (out[:, 0, :, 1:] >= out[:, 0, :, :-1] - 1).all()  # still a ramp: no ringing or wrap-around
    edges = torch.stack([out[:, 0, :, 1] - out[:, 0, :, 0], out[:, 0, :, -1] - out[:, 0, :, -2],
                         out[:, 1, 1] - out[:, 1, 0], out[:, 1, -1] - out[:, 1, -2]])
    assert edges.min() >= 1  # never past the picture's edge, where the border would repeat: flat


def test_look_like_photos_jitters_brightness_contrast_and_saturation_within_the_range():
    colour = torch.tensor([200.0, 100.0, 50.0]).view(1, 3, 1, 1).expand(400, 3, 32, 32).clone()
    out = train.look_like_photos(colour, torch.Generator().manual_seed(0), jitter=0.25)
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))  # a plain colour stays plain: no spatial marks
    pixel = out[:, :, 0, 0]
    assert pixel.min() >= 0 and pixel.max() <= 255
    brightness = pixel.mean(dim=1) / colour[0, :, 0, 0].mean()
    assert brightness.min() < 0.85 and brightness.max() > 1.15 and brightness.min() > 0.75 ** 2 / 1.25
    spread = (pixel[:, 0] - pixel[:, 2]) / 150  # red minus blue: saturation times brightness
    assert spread.min() < 0.8 and spread.max() > 1.2


def test_fractal_pictures_are_drawn_attractors_on_a_background_each_its_own_and_reproducible():
    from fractals import fractal_pictures

    pictures = fractal_pictures(64, torch.Generator().manual_seed(0))
    assert pictures.shape == (64, 3, 32, 32) and pictures.dtype == torch.uint8
    assert torch.equal(pictures, fractal_pictures(64, torch.Generator().manual_seed(0)))
    for picture in pictures:
        colours, counts = picture.flatten(1).T.unique(dim=0, return_counts=True)
        background = counts.max().item() / counts.sum().item()
        assert 0.3 < background < 0.995 and len(colours) >= 3  # a shape in several shades on a plain ground
    assert len({tuple(picture.flatten().tolist()) for picture in pictures}) == 64


def test_pixmix_weights_blend_toward_the_image_or_push_away_from_the_picture():
    a, b = train.mixing_weights(20000, 3.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    a, b = a.flatten(), b.flatten()
    blend = b >= 0
    assert 0.4 < blend.float().mean() < 0.6
    assert abs(a[blend].mean() - 0.75) < 0.02 and abs(b[blend].mean() - 0.25) < 0.02  # Beta(3, 1), Beta(1, 3)
    assert torch.allclose(a[~blend], 1 - b[~blend]) and a[~blend].min() >= 1 and a[~blend].max() <= 2


def test_pixmix_keeps_the_image_the_larger_part_and_leaves_some_untouched():
    from fractals import fractal_pictures

    generator = torch.Generator().manual_seed(0)
    images = random_images(300).float()
    mixed = train.pixmix(images, fractal_pictures(50, generator), generator)
    assert mixed.min() >= 0 and mixed.max() <= 255 and not mixed.isnan().any()
    untouched = (mixed == images).flatten(1).all(dim=1)
    assert 30 <= untouched.sum() <= 90  # no rounds for about one in five
    def correlation(x, y):
        x, y = x.flatten(1) - x.flatten(1).mean(1, keepdim=True), y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
        return ((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))).mean()
    own, others = correlation(mixed[~untouched], images[~untouched]), correlation(mixed, images.roll(1, 0))
    assert own > 0.5 and abs(others) < 0.1, (own, others)


def test_each_epoch_augments_as_the_hyperparameters_say():
    import argparse

    images, labels = random_images(16), torch.arange(16) % 10

    def first_batch(**changes) -> torch.Tensor:
        args = argparse.Namespace(**(train.HYPERPARAMETERS | {"batch_size": 16} | changes))
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        seen = []
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
        train.train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), images, labels, args,
                          torch.Generator().manual_seed(0), 32, 0, 1, lambda step: 0.0)
        return seen[0]

    candidates = torch.cat([normalize(images), normalize(images.flip(3))])

    def plain(batch: torch.Tensor) -> int:
        """How many of the batch are a training image or its mirror, and nothing more."""
        return sum(any(torch.equal(row, candidate) for candidate in candidates) for row in batch)

    unshifted = {"translate": 0, "cutout": 0}
    assert plain(first_batch(**unshifted)) == 16
    assert plain(first_batch(**unshifted, photo_augment=1.0)) == 0  # every one cropped and shrunk
    assert plain(first_batch(**unshifted, pixmix=1.0)) <= 8  # a fifth of them mixed no round


def test_augment_makes_about_the_asked_share_look_like_photos():
    images = random_images(200)
    out = train.augment(images, translate=0, cutout=0, generator=torch.Generator().manual_seed(0), photo_share=0.3)
    untouched = [torch.equal(out[i], normalize(images[i:i + 1])[0]) or torch.equal(out[i], normalize(images[i:i + 1].flip(3))[0])
                 for i in range(200)]
    assert 40 <= untouched.count(False) <= 80
    from fractals import fractal_pictures

    mixed = train.augment(images, translate=0, cutout=0, generator=torch.Generator().manual_seed(0), pixmix_share=0.5,
                          pictures=fractal_pictures(10, torch.Generator().manual_seed(0)))
    untouched = [torch.equal(mixed[i], normalize(images[i:i + 1])[0]) or torch.equal(mixed[i], normalize(images[i:i + 1].flip(3))[0])
                 for i in range(200)]
    assert 60 <= untouched.count(False) <= 100  # half chosen, and a fifth of those mixed no round


def load_recipes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipes", ROOT / "bench" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipes_bench_trains_each_recipe_asked_for_and_adds_its_row(tmp_path, tiny_photo_set, monkeypatch):
    """A recipe that fails gets a row saying so and the next one runs; a second run adds to the table. Smaller
    than one of the recipe's batches of 500, the data set still trains (one step an epoch)."""
    recipes = load_recipes()
    require_the_photo_sets()
    monkeypatch.setattr(train, "DEFAULT_CHECKPOINT", tmp_path / "checkpoint.pt")
    out = tmp_path / "out"
    common = ["--out", str(out), "--data", str(tmp_path / "data"), "--epochs", "1", "--limit", "20"]
    write_model = train.write_model

    def out_of_disk_but_for_photos_ema(model, path, *rest):
        if path.name != "photos-ema.pt":
            raise OSError(28, "No space left on device\n  while writing | the weights")
        return write_model(model, path, *rest)

    monkeypatch.setattr(train, "write_model", out_of_disk_but_for_photos_ema)
    recipes.main(common + ["--only", "photos,photos-ema"])
    recipes.main(common + ["--only", "anchor"])
    card = json.loads((out / "photos-ema.json").read_text())
    shipped = json.loads(classifier.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    header, rule, *rows = (out / "recipes.md").read_text().splitlines()
    why = "failed: OSError: [Errno 28] No space left on device while writing / the weights |" + " |" * 7
    assert rows == [recipes.row("shipped", shipped), f"| photos | {why}", recipes.row("photos-ema", card),
                    f"| anchor | {why}"]
    assert "real photos" in header and rows[2].startswith("| photos-ema | 1 | ") and "of 20 |" in rows[2]
    wanted = recipes.RECIPES["photos-ema"] | {"epochs": 1}
    assert {name: card["hyperparameters"][name] for name in wanted} == wanted
    assert card["history"][0]["loss"] > 0
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"photos-ema{suffix}" for suffix in (".pt", ".json", ".novelty.pt", ".confusion.png", ".reliability.png")) + [
        "recipes.md"]
    assert not (tmp_path / "checkpoint.pt").exists() and card["history"][-1]["epoch"] == 1
    assert all(row.count("|") == header.count("|") for row in rows)


def test_the_recipes_bench_refuses_a_full_run_without_a_gpu(tmp_path, capsys):
    recipes = load_recipes()
    require_the_photo_sets()
    if torch.cuda.is_available():
        cannot_run("this machine has a GPU")
    with pytest.raises(SystemExit):
        recipes.parse_args(["--out", str(tmp_path / "out")])
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_the_average_and_the_checkpoints_are_checked(capsys):
    for flags, message in ((["--ema", "1"], "--ema 1.0: the decay must be"), (["--ema", "-0.5"], "--ema -0.5"),
                           (["--checkpoint-every", "-1"], "--checkpoint-every -1: give a number")):
        with pytest.raises(SystemExit):
            train.parse_args(flags)
        assert message in capsys.readouterr().err


def test_the_recipes_bench_refuses_to_start_without_the_photos_it_measures_on(tmp_path, monkeypatch, capsys):
    recipes = load_recipes()
    monkeypatch.setattr(evaluate, "REAL_PHOTOS", tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        recipes.parse_args(["--out", str(tmp_path / "out")])
    assert f"{tmp_path / 'nowhere'} (no photos)" in capsys.readouterr().err and not (tmp_path / "out").exists()


def require_the_photo_sets() -> None:
    if not any(evaluate.REAL_PHOTOS.glob("*/*")) or not any(evaluate.NOT_CIFAR10.glob("*/*")):
        cannot_run(f"{evaluate.REAL_PHOTOS} or {evaluate.NOT_CIFAR10} is missing")


def test_every_recipe_is_a_train_py_command_line(tmp_path, capsys):
    recipes = load_recipes()
    require_the_photo_sets()
    args = recipes.parse_args(["--out", str(tmp_path), "--limit", "100"])
    for name, recipe in recipes.RECIPES.items():
        parsed = train.parse_args(recipes.train_flags(name, args))
        assert {key: getattr(parsed, key) for key in recipe} == recipe
    with pytest.raises(SystemExit):
        recipes.parse_args(["--out", str(tmp_path), "--only", "anchor,photo"])
    assert "no recipe named photo;" in capsys.readouterr().err


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
