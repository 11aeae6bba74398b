"""Classifier.predict and load_classifier on the shipped weights, and the command line."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import classifier as classifier_module
from classifier import CLASSES, Classifier, WeightsError, build_model, load_classifier, to_uint8_batch
from conftest import ROOT, SplitPass, cannot_run, image_bytes


def pictures() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(7)
    images = [Image.new("RGB", (640, 480), (30, 120, 200)), Image.new("RGB", (32, 32), (250, 250, 250))]
    for size in [(50, 70), (300, 200), (32, 32)]:
        noise = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(noise.numpy()))
    return images


def test_cifar_resnet18_shape():
    model = build_model()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_prediction_fields(classifier):
    predictions = classifier.predict(pictures(), top_k=3)
    assert len(predictions) == 5
    for prediction in predictions:
        assert prediction.label in CLASSES and len(prediction.probabilities) == 10
        assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert all(0.0 <= p <= 1.0 for p in prediction.probabilities)
        probabilities = [p for _, p in prediction.top_k]
        assert len(prediction.top_k) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert prediction.top_k[0] == (prediction.label, prediction.confidence)
        assert prediction.confidence == max(prediction.probabilities)


def test_same_input_same_result(classifier):
    first, second = classifier.predict(pictures()), classifier.predict(pictures())
    assert first == second


def test_batch_and_single_agree(classifier):
    images = pictures()
    batch = classifier.predict(images)
    for image, batched in zip(images, batch):
        [single] = classifier.predict([image])
        assert single.label == batched.label
        assert single.probabilities == pytest.approx(batched.probabilities, abs=0.02)


def test_batches_larger_than_a_chunk(classifier):
    images = pictures() * 30  # 150 images: three chunks
    predictions = classifier.predict(images)
    assert [p.label for p in predictions] == [p.label for p in classifier.predict(pictures())] * 30


def test_empty_input(classifier):
    assert classifier.predict([]) == []


def test_concurrent_predictions_from_many_threads(classifier):
    images = pictures()
    expected = [p.label for p in classifier.predict(images)]
    results, errors = [], []

    def worker():
        try:
            results.append([p.label for p in classifier.predict(images)])
        except Exception as error:  # noqa: BLE001 - any failure in a thread must fail the test
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [expected] * 6


def test_fp32_and_bf16_agree_on_labels(classifier):
    """bf16 is forced on, whatever this CPU supports natively, so the two paths compared really differ."""
    bf16 = Classifier(classifier.model, classifier.version, use_bf16=True)
    fp32 = Classifier(classifier.model, classifier.version, use_bf16=False)
    batch = to_uint8_batch(pictures())
    low, full = bf16.probabilities(batch), fp32.probabilities(batch)
    assert not torch.equal(low, full)  # bf16 rounding shows in the probabilities...
    assert low.argmax(1).tolist() == full.argmax(1).tolist()  # ...not in the labels
    assert torch.allclose(low, full, atol=0.05)


def test_preprocessing_is_anti_aliased():
    """A fine checkerboard must average to grey, not alias into stripes."""
    board = Image.new("L", (512, 512))
    board.putdata([255 * ((x + y) % 2) for y in range(512) for x in range(512)])
    batch = to_uint8_batch([board.convert("RGB")])
    assert batch.shape == (1, 3, 32, 32)
    assert batch.float().std() < 10 and 110 < batch.float().mean() < 145


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="train.py") as caught:
        load_classifier(tmp_path / "nothing.pt")
    assert "nothing.pt" in str(caught.value)


def test_corrupt_weights_say_what_to_do(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be loaded") as caught:
        load_classifier(broken)
    assert "broken.pt" in str(caught.value) and "train.py" in str(caught.value)


def test_weights_of_another_shape_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(WeightsError, match="wrong.pt"):
        load_classifier(wrong)


def test_version_names_the_weights_file(classifier):
    assert classifier.version.startswith("resnet18_cifar10@") and len(classifier.version.split("@")[1]) == 12
    assert classifier_module.DEFAULT_WEIGHTS.stat().st_size < 25e6


def test_command_line_reports_each_file_and_goes_on_after_a_bad_one(tmp_path, store_env):
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes("PNG", size=(100, 80)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"plain text")
    run = subprocess.run([sys.executable, str(ROOT / "classifier.py"), str(bad), str(good), str(tmp_path / "gone.png")],
                         capture_output=True, text=True, timeout=120)
    model, *lines = run.stdout.strip().splitlines()
    assert model.startswith("model v1@") and run.returncode == 1 and len(lines) == 3  # the new store's version 1
    assert lines[0].startswith(f"{bad}\tERROR\t") and "text file" in lines[0]
    name, label, confidence, *flag = lines[1].split("\t")
    assert name == str(good) and label in CLASSES and confidence.endswith("%")
    assert flag in ([], ["maybe none of these classes"])
    assert lines[2].startswith(f"{tmp_path / 'gone.png'}\tERROR\t")


# ---------------------------------------------------------------- calibration and "none of the ten"

@pytest.fixture(scope="module")
def test_sample(test_split: SplitPass) -> SplitPass:
    """2,000 images of the CIFAR-10 test split (a fixed random sample), from the run's one pass over the split."""
    chosen = torch.randperm(len(test_split.labels), generator=torch.Generator().manual_seed(1))[:2000]
    return test_split.sample(chosen)


def test_calibration_changes_no_label_and_keeps_probabilities_summing_to_one(test_sample):
    logits = test_sample.logits
    calibrated = torch.tensor([p.probabilities for p in test_sample.predictions])
    assert torch.equal(calibrated.argmax(dim=1), logits.argmax(dim=1))
    assert torch.allclose(calibrated.sum(dim=1), torch.ones(len(logits)), atol=1e-5)
    raw = logits.softmax(dim=1).max(dim=1).values.mean().item()
    assert calibrated.max(dim=1).values.mean().item() > raw + 0.1  # label smoothing's timidity undone


def test_confidence_means_what_it_says_on_test_images(test_sample):
    """Of the predictions shown at 90% or more, about that share are right; the same below 90%."""
    predictions = test_sample.predictions
    confidence = torch.tensor([p.confidence for p in predictions])
    correct = torch.tensor([CLASSES.index(p.label) for p in predictions]) == test_sample.labels
    for inside in (confidence >= 0.9, confidence < 0.9):
        assert abs(correct[inside].float().mean() - confidence[inside].mean()) < 0.05


def test_about_five_percent_of_test_images_are_flagged_none_of_the_ten(classifier, test_sample):
    predictions = test_sample.predictions
    flagged = sum(p.is_ood for p in predictions) / len(predictions)
    assert 0.02 < flagged < 0.08, flagged
    assert all((p.ood_score > classifier.novelty.threshold) == p.is_ood for p in predictions)


def test_photos_of_other_animals_score_higher_than_cifar_images(classifier, test_sample):
    from evaluate import auroc, not_cifar10_photos

    others = not_cifar10_photos()
    if others is None:
        cannot_run("../shared/data/not-cifar10-dev is missing")
    other_scores = classifier.novelty.scores(classifier.outputs(others)[1])
    test_scores = classifier.novelty.scores(test_sample.features)
    assert auroc(other_scores, test_scores) > 0.85


def test_real_photos_of_the_ten_score_as_the_model_card_says(classifier):
    """The card's numbers on real photos are what the app's own path gives now, and no worse than the shipped
    model's 142 of 164 right, 12 flagged and AUROC 0.84 against photos of other animals."""
    import json

    from evaluate import not_cifar10_photos, real_photos_report

    others = not_cifar10_photos()
    measured = real_photos_report(classifier, others)
    if measured is None or others is None:
        cannot_run("../shared/data/real-photos-dev or ../shared/data/not-cifar10-dev is missing")
    card = json.loads(classifier_module.DEFAULT_WEIGHTS.with_suffix(".json").read_text())["real_photos"]
    assert measured["photos"] == card["photos"] == 164
    assert abs(measured["right"] - card["right"]) <= 1 and abs(measured["flagged"] - card["flagged"]) <= 1, measured
    assert abs(measured["auroc_not_cifar10_vs_these"] - card["auroc_not_cifar10_vs_these"]) < 0.01, measured
    assert measured["right"] >= 141 and measured["flagged"] <= 13, measured
    assert measured["auroc_not_cifar10_vs_these"] >= 0.82 and measured["ece"] <= 0.09, measured


def test_a_stray_file_or_folder_among_the_photos_is_skipped_with_a_warning(classifier, tmp_path):
    from evaluate import real_photos_report

    for folder in ("cat", "cats"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / folder / "photo.jpg")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "cat" / "notes.txt").write_text("not a photo")
    with pytest.warns(UserWarning) as caught:
        report = real_photos_report(classifier, None, tmp_path)
    assert report["photos"] == 1
    messages = [str(warning.message) for warning in caught]
    assert any("cats/ is not one of airplane" in message for message in messages)
    assert any("notes.txt" in message for message in messages) and not any(".DS_Store" in m for m in messages)


def test_the_model_card_describes_the_shipped_weights():
    import json

    card = json.loads(classifier_module.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert card["weights_sha256"] == classifier_module.file_sha256(classifier_module.DEFAULT_WEIGHTS)
    assert card["calibration"]["ece_after"] <= 0.02 < card["calibration"]["ece_before"]
    assert card["novelty"]["test_flagged"] <= 0.05 and card["novelty"]["auroc_vs_photo_like_test_split"] >= 0.85
    assert classifier_module.novelty_path(classifier_module.DEFAULT_WEIGHTS).stat().st_size < 8e6


def test_a_model_card_of_other_weights_is_a_clear_error(tmp_path):
    """A run that wrote new weights and died before their card leaves the old card beside them: its calibration
    and threshold belong to other weights, and the page would show numbers that mean nothing."""
    import shutil

    weights = tmp_path / "model.pt"
    state = torch.load(classifier_module.DEFAULT_WEIGHTS, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, weights)
    shutil.copy(classifier_module.DEFAULT_WEIGHTS.with_suffix(".json"), weights.with_suffix(".json"))
    shutil.copy(classifier_module.novelty_path(classifier_module.DEFAULT_WEIGHTS), classifier_module.novelty_path(weights))
    with pytest.raises(WeightsError, match="model card .*model.json describes other weights") as caught:
        load_classifier(weights)
    assert "evaluate.py --weights" in str(caught.value)


def test_a_corrupt_model_card_is_a_clear_error(tmp_path):
    import shutil

    weights = tmp_path / "model.pt"
    shutil.copy(classifier_module.DEFAULT_WEIGHTS, weights)
    weights.with_suffix(".json").write_text('{"calibration": {"parameters": {"a": ')
    with pytest.raises(WeightsError, match="model card .*model.json.* is unusable") as caught:
        load_classifier(weights)
    assert "evaluate.py" in str(caught.value)
    weights.with_suffix(".json").write_text('{"novelty": {"threshold": 0.1}}')  # names a bank that is not there
    with pytest.raises(WeightsError, match="novelty bank"):
        load_classifier(weights)
