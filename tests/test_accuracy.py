"""The shipped weights reach the target on the CIFAR-10 test split, measured through Classifier.predict."""

from __future__ import annotations

import pytest

import train
from evaluate import evaluate

TARGET = 0.925


def test_shipped_weights_reach_the_target(classifier):
    if not train.SHARED_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {train.SHARED_ARCHIVE}: accuracy not measured")
    data = train.load_cifar10(str(train.SHARED_ARCHIVE))
    result = evaluate(classifier, data["test_x"], data["test_y"])
    assert result["images"] == 10_000
    assert result["accuracy"] >= TARGET, f"test accuracy {result['accuracy']:.2%} is below {TARGET:.1%}"
