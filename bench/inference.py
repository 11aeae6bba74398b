"""Benchmark: photo-sized uploads through a naive pipeline vs. the app's (load_image + Classifier.predict).

    python bench/inference.py [--count 48] [--repeat 2]

(a) naive: full Pillow decode, resize to 32x32, one fp32 forward per image (what a straightforward app does);
(b) ours: load_image (JPEG draft decoding, small working copy) + one batched, bf16, channels_last predict
    call that also runs flip test-time augmentation. Both run in this process on the same files.

Then memory: eight 64-megapixel uploads (4 PNG, 4 WebP; neither format can be decoded at reduced scale)
decoded on DECODE_THREADS threads, (a) with a plain full decode and (b) with load_image; peak RSS of each,
measured in a fresh child process so that one cannot hide in the other's peak.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classifier import MEAN, STD, build_model, load_classifier  # noqa: E402
from inputs import DECODE_THREADS, load_image  # noqa: E402

UPLOADS = ROOT / "bench" / "uploads"
SIZES = (((4000, 3000), "JPEG"), ((1600, 1200), "JPEG"), ((1600, 1200), "PNG"))


def make_uploads(count: int) -> list[Path]:
    """Photo-like files (smooth colour fields plus sensor-like noise), made once and kept in a git-ignored folder."""
    UPLOADS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        (width, height), image_format = SIZES[0] if index % 2 == 0 else SIZES[1 + (index // 2) % 2]
        path = UPLOADS / f"upload-{index:02d}-{width}x{height}.{image_format.lower()}"
        if not path.exists():
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
            noise = rng.normal(0, 6, (height, width, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
        paths.append(path)
    return paths


def naive_predict(model: torch.nn.Module, path: Path) -> int:
    image = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        return int(model(x.unsqueeze(0)).argmax())


LARGE_SIZE = (8000, 8000)


def make_large_uploads() -> list[Path]:
    """Four PNGs and four WebPs of 64 megapixels, smooth so that each stays under the 20 MB upload limit."""
    UPLOADS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(8):
        image_format = "PNG" if index < 4 else "WEBP"
        path = UPLOADS / f"large-{index}-{LARGE_SIZE[0]}x{LARGE_SIZE[1]}.{image_format.lower()}"
        if not path.exists():
            small = rng.integers(0, 256, (6, 8, 3 if index % 2 else 4), dtype=np.uint8)  # half of them with alpha
            Image.fromarray(small).resize(LARGE_SIZE, Image.Resampling.BICUBIC).save(path, image_format)
        paths.append(path)
    return paths


DECODE_MEMORY = r"""
import resource, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from PIL import Image
from inputs import DECODE_THREADS, load_image

Image.MAX_IMAGE_PIXELS = None
def full(path):
    with Image.open(path) as image:
        return image.convert("RGB").resize((512, 512))
decode = full if sys.argv[2] == "full" else lambda path: load_image(path.read_bytes(), path.name)
with ThreadPoolExecutor(DECODE_THREADS) as pool:
    list(pool.map(decode, [Path(p) for p in sys.argv[3:]]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def decode_peak_rss_mb(how: str, paths: list[Path]) -> float:
    import subprocess

    run = subprocess.run([sys.executable, "-c", DECODE_MEMORY, str(ROOT), how, *map(str, paths)],
                         capture_output=True, text=True, check=True)
    return float(run.stdout.strip())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds of each path (best is reported)")
    args = parser.parse_args()
    paths = make_uploads(args.count)
    megabytes = sum(path.stat().st_size for path in paths) / 1e6
    print(f"{len(paths)} uploads, {megabytes:.0f} MB: "
          + ", ".join(f"{sum(1 for p in paths if f'{w}x{h}.{f.lower()}' in p.name)} x {w}x{h} {f}" for (w, h), f in SIZES))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    started = time.perf_counter()
    classifier = load_classifier()
    loaded = time.perf_counter() - started
    classifier.predict([load_image(paths[0].read_bytes(), paths[0].name)])
    first = time.perf_counter() - started
    print(f"model load: {loaded:.2f} s; load + first prediction (one {paths[0].name.split('-')[-1]}): {first:.2f} s")

    naive_model = build_model()
    naive_model.load_state_dict(classifier.model.state_dict())
    naive_model.eval()

    def run_naive() -> list[int]:
        return [naive_predict(naive_model, path) for path in paths]

    def decode_ours() -> list:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:  # Pillow decodes with the GIL released
            return list(pool.map(lambda path: load_image(path.read_bytes(), path.name), paths))

    def run_ours() -> list[str]:
        return [prediction.label for prediction in classifier.predict(decode_ours())]

    def bare_decode(path: Path) -> None:
        """The floor: only the pixels, at the reduced scale JPEG allows, nothing else (no checks, no resize)."""
        with Image.open(path) as image:
            image.draft("RGB", (256, 256))
            image.load()

    def decode_floor() -> None:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            list(pool.map(bare_decode, paths))

    timings = {"naive": [], "ours": [], "ours: decoding": [], "floor": []}
    for _ in range(args.repeat):
        for name, function in (("naive", run_naive), ("ours", run_ours), ("ours: decoding", decode_ours),
                               ("floor", decode_floor)):
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    naive_rate = len(paths) / min(timings["naive"])
    our_rate = len(paths) / min(timings["ours"])
    print(f"(a) naive: full decode + resize + fp32 forward per image: {naive_rate:6.1f} images/s")
    print(f"(b) ours:  load_image + batched Classifier.predict (TTA):   {our_rate:6.1f} images/s")
    print(f"speed-up: {our_rate / naive_rate:.1f}x")
    print(f"of (b)'s {min(timings['ours']):.2f} s: load_image {min(timings['ours: decoding']):.2f} s on "
          f"{DECODE_THREADS} threads, where a bare reduced-scale decode of the same files takes "
          f"{min(timings['floor']):.2f} s; the model the rest")
    print(f"peak RSS: {peak_rss_mb():.0f} MB")

    large = make_large_uploads()
    full, ours = decode_peak_rss_mb("full", large), decode_peak_rss_mb("ours", large)
    print(f"8 uploads of 64 MP (4 PNG, 4 WebP) on {DECODE_THREADS} threads, peak RSS: (a) full decode {full:.0f} MB, "
          f"(b) load_image {ours:.0f} MB ({full / ours:.1f}x less)")


if __name__ == "__main__":
    main()
