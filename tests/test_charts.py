"""charts.py figures show what the numbers say, including the empty case."""

from __future__ import annotations

from classes import CLASSES
from charts import accuracy_figure, class_distribution_figure, confusion_matrix_figure, per_class_accuracy_figure


def bar_widths(figure) -> list[float]:
    return [patch.get_width() for patch in figure.axes[0].patches]


def test_class_distribution_has_every_class_in_order():
    figure = class_distribution_figure({"cat": 3, "ship": 1})
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    assert labels == list(CLASSES)
    assert bar_widths(figure) == [3 if name == "cat" else 1 if name == "ship" else 0 for name in CLASSES]


def test_class_distribution_of_nothing_draws_zero_bars():
    figure = class_distribution_figure({})
    assert bar_widths(figure) == [0] * 10
    figure.savefig(__import__("io").BytesIO(), format="png")


def test_accuracy_figure_shows_counts_and_percentage():
    figure = accuracy_figure(3, 1)
    assert bar_widths(figure) == [3, 1]
    assert "75.0%" in figure.axes[0].get_title() and "of 4" in figure.axes[0].get_title()
    assert "no data" in accuracy_figure(0, 0).axes[0].get_title()


def test_confusion_matrix_writes_counts():
    matrix = [[0] * 10 for _ in range(10)]
    matrix[3][5] = 7
    figure = confusion_matrix_figure(matrix)
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts == ["7"]


def test_per_class_accuracy():
    matrix = [[0] * 10 for _ in range(10)]
    matrix[3][3], matrix[3][5] = 3, 1
    figure = per_class_accuracy_figure(matrix)
    assert bar_widths(figure)[3] == 75.0 and sum(bar_widths(figure)) == 75.0
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert labels[3] == "75% of 4" and labels[0] == "none"
