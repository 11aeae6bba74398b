"""The ten CIFAR-10 classes in the data set's order: what the model predicts and what every record is labelled
with. A module of its own, so that the data layer, the charts and the command line know them without torch."""

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
