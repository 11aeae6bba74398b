"""The CIFAR-10 data for training and evaluation: the shared JPEG archive (or a folder, or torchvision's copy)
decoded into uint8 tensors once and cached in the git-ignored .cache/."""

from __future__ import annotations

import os
import shutil
import tarfile
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from classes import CLASSES
from classifier import file_sha256, to_uint8_batch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def decode_image_folder(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode <split>/<class>/*.jpg|png into uint8 (N, 3, 32, 32) images and int64 labels; anything else in
    a class folder is skipped with a warning."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise SystemExit(f"{class_dir} is missing: expected one folder per CIFAR-10 class in {split_dir}")
        for path in sorted(class_dir.iterdir()):
            try:
                with Image.open(path) as image:
                    images.append(to_uint8_batch([image.convert("RGB")]))
            except (UnidentifiedImageError, OSError) as error:
                warnings.warn(f"skipped {path}: not a readable image ({error.__class__.__name__})", stacklevel=2)
                continue
            labels.append(label)
    if not labels:
        raise SystemExit(f"{split_dir} holds no images")
    return torch.cat(images), torch.tensor(labels)


def extract_split(archive: Path, target: Path, split: str) -> None:
    """Extract one split of the JPEG archive into target/<split>, once: the tests, which need only the test split,
    never write the 50,000 training images (extracting them took four times as long as the 10,000)."""
    if (target / split).is_dir():
        return
    partial = target.with_name(f"{target.name}.{split}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            # The archive may hold train/ and test/ at its top or under one folder.
            folders = {parent for member in members for parent in PurePosixPath(member.name).parents}
            top = next((folder.parent for folder in folders
                        if folder.name == "test" and folder.parent / "train" in folders), None)
            if top is None:
                raise SystemExit(f"{archive} has no train/ and test/ folders (one folder per class in each)")
            tar.extractall(partial, members=[member for member in members
                                             if top / split in PurePosixPath(member.name).parents], filter="data")
    except tarfile.TarError as error:
        raise SystemExit(f"{archive} is not a readable tar archive ({error})") from error
    target.mkdir(parents=True, exist_ok=True)
    (partial / top / split).rename(target / split)
    shutil.rmtree(partial)


def load_cifar10(data: str | None, splits: tuple[str, ...] = ("train", "test")) -> dict:
    """Uint8 tensors for the splits asked for, each extracted (from an archive) and decoded once, and cached as
    .npz beside the extracted files: the tests ask for the test split alone."""
    source: dict = {}
    if data is None and SHARED_ARCHIVE.is_file():
        data = str(SHARED_ARCHIVE)
    if data is None:
        return load_torchvision_cifar10(CACHE / "cifar10-torchvision", download=True, splits=splits)
    path = Path(data)
    if path.is_file():
        source = {"archive": str(path.resolve()), "archive_sha256": file_sha256(path)}
        folder = CACHE / f"cifar10-jpeg-{source['archive_sha256'][:12]}"
    elif (path / "train").is_dir() and (path / "test").is_dir():
        folder, source = path, {"folder": str(path.resolve())}
    elif (path / "cifar-10-batches-py").is_dir():
        return load_torchvision_cifar10(path, download=False, splits=splits)
    else:
        raise SystemExit(f"--data {data}: not a CIFAR-10 archive, nor a folder with train/ and test/ (one folder "
                         "per class in each), nor a torchvision CIFAR-10 root (with cifar-10-batches-py/)")

    arrays = {}
    for split in splits:
        cache_file = folder.with_name(f"{folder.name}.{split}.npz") if folder.is_relative_to(CACHE) else None
        if cache_file is not None and cache_file.is_file():
            arrays |= dict(np.load(cache_file))
        else:
            if "archive" in source:
                extract_split(path, folder, split)
            images, labels = decode_image_folder(folder / split)
            decoded = {f"{split}_x": images.numpy(), f"{split}_y": labels.numpy()}
            if cache_file is not None:
                partial = cache_file.with_suffix(".partial.npz")
                np.savez(partial, **decoded)
                os.replace(partial, cache_file)  # a run killed while saving leaves no half-written cache
            arrays |= decoded
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    return {**tensors, "source": source}


def load_torchvision_cifar10(root: Path, download: bool, splits: tuple[str, ...]) -> dict:
    """The original CIFAR-10 through torchvision, downloaded into the cache only when asked for (needs internet)."""
    from torchvision.datasets import CIFAR10

    tensors = {}
    for split in splits:
        dataset = CIFAR10(str(root), train=split == "train", download=download)
        tensors[f"{split}_x"] = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        tensors[f"{split}_y"] = torch.tensor(dataset.targets)
    return {**tensors, "source": {"torchvision_root": str(root.resolve())}}
