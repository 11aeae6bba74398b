"""Matplotlib figures of the saved feedback, drawn with the non-interactive Agg backend (safe in server threads)."""

from __future__ import annotations

import io
from typing import Mapping, Sequence

from matplotlib.figure import Figure

from classes import CLASSES

CORRECT_COLOR = "#2e7d32"
INCORRECT_COLOR = "#c62828"
BAR_COLOR = "#1f77b4"


def class_distribution_figure(counts: Mapping[str, int]) -> Figure:
    """Saved images per final label, every class shown (a zero bar says 'none yet', not 'missing')."""
    values = [counts.get(name, 0) for name in CLASSES]
    # Fixed margins, not a layout engine: the labels are known, and it draws a third faster (every save).
    figure = Figure(figsize=(4, 3.2))
    figure.subplots_adjust(left=0.22, right=0.96, top=0.91, bottom=0.14)
    axes = figure.subplots()
    bars = axes.barh(CLASSES, values, color=BAR_COLOR)
    axes.invert_yaxis()
    axes.bar_label(bars, padding=2, fontsize=8)
    axes.set_xlabel("saved images")
    axes.set_title("Class distribution (final labels)", fontsize=10)
    axes.set_xlim(0, max(values + [1]) * 1.2)
    axes.tick_params(labelsize=8)
    return figure


def accuracy_figure(correct: int, incorrect: int) -> Figure:
    """Correct vs corrected predictions, with the accuracy in the title."""
    total = correct + incorrect
    figure = Figure(figsize=(4, 1.8))
    figure.subplots_adjust(left=0.2, right=0.96, top=0.85, bottom=0.16)
    axes = figure.subplots()
    bars = axes.barh(["correct", "incorrect"], [correct, incorrect], color=[CORRECT_COLOR, INCORRECT_COLOR])
    axes.invert_yaxis()
    axes.bar_label(bars, padding=2, fontsize=8)
    accuracy = f"{correct / total:.1%}" if total else "no data"
    axes.set_title(f"Model accuracy: {accuracy} of {total}", fontsize=10)
    axes.set_xlim(0, max(correct, incorrect, 1) * 1.25)
    axes.tick_params(labelsize=8)
    return figure


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], title: str = "Confusion matrix") -> Figure:
    """Rows are true (final) labels, columns predicted labels; counts written in each cell."""
    size = len(CLASSES)
    figure = Figure(figsize=(6, 5.2), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(size), CLASSES, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(size), CLASSES, fontsize=8)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title(title, fontsize=10)
    peak = max((max(row) for row in matrix), default=0)
    for row in range(size):
        for column in range(size):
            value = matrix[row][column]
            if value:
                axes.text(column, row, str(value), ha="center", va="center", fontsize=7,
                          color="white" if value > peak / 2 else "black")
    return figure


def per_class_accuracy_figure(matrix: Sequence[Sequence[int]]) -> Figure:
    """For each true (final) class, the share the model got right; classes with no saved images are left blank."""
    totals = [sum(row) for row in matrix]
    accuracies = [matrix[i][i] / totals[i] if totals[i] else 0.0 for i in range(len(CLASSES))]
    figure = Figure(figsize=(4, 3.2), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(CLASSES, [a * 100 for a in accuracies], color=BAR_COLOR)
    axes.invert_yaxis()
    axes.bar_label(bars, labels=[f"{a:.0%} of {n}" if n else "none" for a, n in zip(accuracies, totals)],
                   padding=2, fontsize=7)
    axes.set_xlim(0, 130)
    axes.set_xlabel("% predicted correctly")
    axes.set_title("Accuracy per class (saved feedback)", fontsize=10)
    axes.tick_params(labelsize=8)
    return figure


def to_png(figure: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes: drawn once, then cached and sent as is."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
