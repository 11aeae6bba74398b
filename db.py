"""The one data layer: saved predictions (records) and their images, for both pages and the command line.

    python db.py export FILE.zip   # every record and image: ImageFolder by final label + labels.csv, streamed
    python db.py import FILE.zip   # restore such an archive (or a plain ImageFolder ZIP) into the configured store

Records live in SQLite (CIFAR10_DB_PATH) or, when CIFAR10_DATABASE_URL is set, PostgreSQL; images, named by
content hash, in a folder (CIFAR10_IMAGE_DIR) or, when CIFAR10_IMAGE_STORE=s3://bucket/prefix is set, any
S3-compatible object store. This module is the data layer's one interface (what the pages import) and its
command line; behind it, by job: records.py (what a record is), store.py (the Store), sql.py (every SQL
statement and the migrations), database_sqlite.py / database_postgres.py and images_folder.py / images_s3.py (one
module per backend), archives.py (export and import), settings.py (which store, the admin password, the admins
and who may do what).

What keeps rows and images consistent, whatever is killed when and however many servers share the store:
- every write runs under one store-wide write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: the store_meta row);
- an image is written before the row naming it commits, under that lock;
- an image is removed only under that lock, after the deletion of its row committed, and only if no row names
  it then: a concurrent save of the same picture either finished first (its row keeps the image) or starts after
  (and writes the image again);
- the leftovers of a killed save are removed only among names this store writes, older than a grace period;
- nothing is removed from an image store that another database also uses (each database leaves a marker).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from archives import ArchiveError, import_archive, iter_csv, iter_zip
from records import (Change, ExportTally, NewPrediction, RecordFilter, SavedPrediction, SettingsError, StoreError,
                     Summary)
from settings import (ADMIN_PASSWORD_ENV, CLEAR, DELETE, IMPROVE, Person, admin_password_ok, admin_refusal,
                      configured_admin_password, configured_admins, refusal)
from store import Store, open_store

__all__ = ["ArchiveError", "CLEAR", "Change", "DELETE", "IMPROVE", "NewPrediction", "Person", "RecordFilter",
           "SavedPrediction", "SettingsError", "Store", "StoreError", "Summary", "admin_password_ok", "admin_refusal",
           "configured_admin_password", "configured_admins", "iter_csv", "iter_zip", "open_store", "refusal"]


# ---------------------------------------------------------------- command line

def _progress(done: int, total: int) -> None:
    filled = int(30 * done / max(1, total))
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    print(f"\rimporting [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def _predictor(store: Store):
    """What predicts the images of an archive without labels.csv: the version the store has active. The command
    line composes the store and the model: torch is loaded only for such an archive, and only once."""
    loaded = []

    def predict(images: list) -> tuple[list, str]:
        if not loaded:
            from classifier import load_version
            from versions import active_version

            loaded.append(load_version(store, active_version(store)))
        return loaded[0].predict(images), loaded[0].version

    return predict


def _failed(error: Exception) -> int:
    """Say on one line what failed, never with a traceback: a foreseen failure in its own words, anything else
    (a server's refusal, a bug) with its kind. Returns the exit status."""
    reason = " ".join(str(error).split()) or "no details"
    foreseen = isinstance(error, (StoreError, ArchiveError, OSError))
    print(f"error: {reason if foreseen else f'{type(error).__name__}: {reason}'}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    import argparse
    import getpass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export", "import"])
    parser.add_argument("archive", type=Path)
    args = parser.parse_args(argv)
    try:
        store = Store.from_env()
    except Exception as error:
        return _failed(error)
    try:
        print(f"store: {store.describe()}", file=sys.stderr)
        if args.command == "export":
            args.archive.parent.mkdir(parents=True, exist_ok=True)
            partial = args.archive.with_name(args.archive.name + ".partial")
            tally = ExportTally()
            with open(partial, "wb") as stream:
                for chunk in iter_zip(store, tally):
                    stream.write(chunk)
            os.replace(partial, args.archive)
            print(f"wrote {tally.written} record{'s' * (tally.written != 1)} to {args.archive}", file=sys.stderr)
            if tally.missing:
                print(f"left out {len(tally.missing)} record(s) whose image is missing from {store.images.description}:",
                      file=sys.stderr)
                for record in tally.missing:
                    print(f"  id {record.id}: {record.source!r} ({record.image_file})", file=sys.stderr)
            return 0
        if configured_admin_password() and not admin_password_ok(getpass.getpass("Admin password: ")):
            print(f"error: wrong admin password ({ADMIN_PASSWORD_ENV} is set): nothing imported.", file=sys.stderr)
            return 1
        from display import thumbnail

        result = import_archive(store, args.archive, _predictor(store), _progress, make_thumbnail=thumbnail)
        skipped = len(result.duplicates)
        print(f"imported {result.saved} records; {result.unchanged} were already saved; {skipped} "
              f"duplicate{'s' * (skipped != 1)} skipped", file=sys.stderr)
        for duplicate in result.duplicates:
            print(f"  skipped {duplicate.member!r}: the same picture as {duplicate.kept!r}, imported with the label "
                  f"{duplicate.label}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        return _failed(error)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
