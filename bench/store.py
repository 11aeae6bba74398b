"""Benchmark: the store on each backend, SQLite + a folder and PostgreSQL + S3 (real servers started here).

    python bench/store.py [--records 100000] [--repeat 5]

For each backend, in this process:
- time to save 20 photos (the benchmark uploads of bench/inference.py, 0.3 to 4 MB each) in one Save;
- saves per second: one Save of one 100 KB image after another, from one client and from four at once;
- History's queries (count, filtered count, first and a deep page, date range, sidebar summary, revision) at
  20 records and at --records records; the ratio says how much slower the big store answers.
Medians of --repeat runs. Prints numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import sql  # noqa: E402
from classes import CLASSES  # noqa: E402
from database_postgres import PostgresDatabase  # noqa: E402
from database_sqlite import SQLiteDatabase  # noqa: E402
from db import NewPrediction, RecordFilter, Store  # noqa: E402
from images_folder import FolderImages  # noqa: E402
from images_s3 import S3Images  # noqa: E402
from inference import make_uploads  # noqa: E402
from servers import PostgresServer, SeaweedServer  # noqa: E402


def median_seconds(function, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def photo(data: bytes, name: str) -> NewPrediction:
    """A fresh picture each time: a run tag after the image data makes new content (and a new hash)."""
    data = data + uuid.uuid4().bytes
    return NewPrediction(hashlib.sha256(data).hexdigest(), data, "jpg", name, "cat", 0.8, "dog", "bench")


def fill(store: Store, count: int) -> None:
    """count records straight into the database in big batches (their images are not what History's queries read)."""
    start = time.perf_counter()
    for first in range(0, count, 5000):
        rows = []
        for index in range(first, min(count, first + 5000)):
            digest = hashlib.sha256(f"record {index}".encode()).hexdigest()
            day = f"2026-{1 + index % 12:02d}-{1 + index % 28:02d}T{index % 24:02d}:00:00+00:00"
            predicted, final = CLASSES[index % 10], CLASSES[(index // 7) % 10]
            rows.append({"content_hash": digest, "image_file": f"{digest}.jpg", "source": f"photo-{index}.jpg",
                         "predicted_label": predicted, "confidence": 0.5, "final_label": final,
                         "is_correct": int(predicted == final), "created_at": day, "model_version": "bench",
                         "edits": 0})
        with store.database.transaction(write=True) as cursor:
            sql.insert_rows(cursor, rows)
            sql.bump_revision(cursor)
    print(f"  filled {count} records in {time.perf_counter() - start:.1f} s", flush=True)


def history_queries(store: Store) -> dict[str, Callable[[], object]]:
    dogs = RecordFilter(labels=("dog", "cat"), corrected_only=True)
    deep = max(0, min(50_000, store.count() - 50))
    return {
        "count all": lambda: store.count(),
        "count filtered": lambda: store.count(dogs),
        "first page (50)": lambda: store.list_predictions(limit=50),
        "filtered page 20": lambda: store.list_predictions(dogs, limit=50, offset=950),
        "deepest page (up to 50,000)": lambda: store.list_predictions(limit=50, offset=deep),
        "date range": lambda: store.date_range(),
        "sidebar summary": lambda: store.summary(),
        "revision": lambda: store.revision(),
    }


def bench_backend(name: str, make_store: Callable[[str], Store], uploads: list[bytes], records: int, repeat: int) -> None:
    print(f"\n== {name}", flush=True)
    store = make_store("saves")
    batch_seconds = median_seconds(
        lambda: store.save_predictions([photo(data, f"upload-{i}.jpg") for i, data in enumerate(uploads)]), repeat)
    megabytes = sum(map(len, uploads)) / 1e6
    print(f"  save 20 photos ({megabytes:.0f} MB) in one Save: {batch_seconds * 1000:.0f} ms")

    small = os.urandom(100_000)

    def saves_per_second(clients: int, seconds: float = 3.0) -> float:
        stores = [make_store("saves") for _ in range(clients)]  # separate connections, one shared store
        deadline = time.perf_counter() + seconds

        def client(own: Store) -> int:
            done = 0
            while time.perf_counter() < deadline:
                own.save_predictions([photo(small, "small.jpg")])
                done += 1
            return done

        with ThreadPoolExecutor(clients) as pool:
            total = sum(pool.map(client, stores))
        for own in stores:
            own.close()
        return total / seconds

    print(f"  saves per second (one 100 KB image each): one client {saves_per_second(1):.0f}, "
          f"four clients {saves_per_second(4):.0f}", flush=True)

    small_store = make_store("small")
    fill(small_store, 20)
    small_times = {label: median_seconds(query, repeat) for label, query in history_queries(small_store).items()}
    big_store = make_store("big")
    fill(big_store, records)
    print(f"  History queries, median of {repeat}: 20 records / {records:,} records (ratio)")
    for label, query in history_queries(big_store).items():
        big = median_seconds(query, repeat)
        print(f"    {label:<26} {small_times[label] * 1000:7.2f} ms / {big * 1000:8.2f} ms "
              f"({big / small_times[label]:5.1f}x)")
    for opened in (store, small_store, big_store):
        opened.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    uploads = [path.read_bytes() for path in make_uploads(20)]
    folder = Path(tempfile.mkdtemp(prefix="cifar10-bench-"))
    postgres, s3 = PostgresServer(), SeaweedServer()
    os.environ.update(s3.env())
    try:
        bench_backend("SQLite + image folder (this machine's disk)",
                      lambda key: Store(SQLiteDatabase(folder / f"{key}.db"), FolderImages(folder / key)),
                      uploads, args.records, args.repeat)
        databases: dict[str, str] = {}

        def postgres_store(key: str) -> Store:
            if key not in databases:
                databases[key] = postgres.database(f"bench_{key}")
            return Store(PostgresDatabase(databases[key]), S3Images(f"s3://cifar10-bench/{key}"))

        bench_backend("PostgreSQL + S3 (SeaweedFS), both on 127.0.0.1", postgres_store, uploads, args.records,
                      args.repeat)
    finally:
        postgres.close()
        s3.close()


if __name__ == "__main__":
    main()
