"""Images as objects under s3://bucket/prefix, on AWS or any S3-compatible store (a team's shared store)."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator, Sequence

from image_store import IMAGE_NAME, IMAGE_THREADS, MODEL_FILE, OWNERS_SUFFIX
from records import ImageMissing, SettingsError, StoreError
from settings import IMAGE_STORE_ENV, split_url


class S3Images:
    """Images as objects under s3://bucket/prefix, on AWS or any S3-compatible store (AWS_ENDPOINT_URL)."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        parts = split_url(IMAGE_STORE_ENV, url, ("s3",), "s3://bucket/prefix")
        if not re.fullmatch(r"[a-zA-Z0-9.\-_]{1,255}", parts.netloc):  # the bucket names botocore accepts
            raise SettingsError(f"{IMAGE_STORE_ENV} is not of the form s3://bucket/prefix: it names no bucket (of "
                                "letters, digits, '.', '-' and '_'; credentials go in AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY).")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        if self.endpoint and not split_url("AWS_ENDPOINT_URL", self.endpoint, ("http", "https"),
                                            "http://host:port").hostname:
            raise SettingsError("AWS_ENDPOINT_URL is not of the form http://host:port: it names no host.")
        self.description = f"the object store {url}" + (f" at {self.endpoint}" if self.endpoint else "")
        config = Config(s3={"addressing_style": "path" if self.endpoint else "auto"}, connect_timeout=3,
                        read_timeout=20, retries={"max_attempts": 2, "mode": "standard"},
                        max_pool_connections=2 * IMAGE_THREADS)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=config)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except NoCredentialsError as error:
            raise StoreError(f"{self.description}: no credentials. Set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY.") from error
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                hint = "Check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and that they may use this bucket."
            else:
                hint = f"Check {IMAGE_STORE_ENV} and AWS_ENDPOINT_URL."
            raise StoreError(f"{self.description} refused the request ({code or error}). {hint}") from error
        except BotoCoreError as error:
            raise StoreError(f"{self.description} could not be reached ({error}). Check that it is running and "
                             "that AWS_ENDPOINT_URL is right.") from error

    def _ensure_bucket(self) -> None:
        """Create the bucket when it is missing, once per process."""
        from botocore.exceptions import ClientError

        if self._bucket_ready:
            return
        with self._bucket_lock, self._errors():
            if self._bucket_ready:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                region = self.client.meta.region_name
                try:
                    self.client.create_bucket(Bucket=self.bucket, **(
                        {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}))
                except ClientError as create_error:
                    code = create_error.response.get("Error", {}).get("Code", "")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise StoreError(f"{self.description}: the bucket {self.bucket!r} does not exist and could not "
                                         f"be created ({code or create_error}). Create it, or use credentials allowed "
                                         "to.") from create_error
            self._bucket_ready = True

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        self._ensure_bucket()
        with self._errors(), ThreadPoolExecutor(IMAGE_THREADS) as pool:
            list(pool.map(lambda item: self.client.put_object(Bucket=self.bucket, Key=self._key(item[0]), Body=item[1]),
                          items))

    def get(self, name: str) -> bytes:
        self._ensure_bucket()
        with self._errors():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            except self.client.exceptions.NoSuchKey as error:
                raise ImageMissing(f"{self.description} has no {name}.") from error

    def delete_many(self, names: Sequence[str]) -> None:
        self._ensure_bucket()
        with self._errors():
            for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
                keys = [{"Key": self._key(name)} for name in names[start:start + 1000]]
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StoreError(f"{self.description} could not delete {first.get('Key')} ({first.get('Code')}).")

    def _list(self, prefix: str) -> Iterator[dict]:
        self._ensure_bucket()
        with self._errors():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def stored(self) -> Iterator[tuple[str, float]]:
        return self._stored("", IMAGE_NAME)

    def stored_models(self) -> Iterator[tuple[str, float]]:
        return self._stored("models/", MODEL_FILE)

    def _stored(self, folder: str, names: re.Pattern) -> Iterator[tuple[str, float]]:
        """(name, modification time) of the objects under folder/ whose names (from the prefix on) are `names`."""
        start = len(self._key(""))
        for item in self._list(self._key(folder)):
            name = item["Key"][start:]
            if names.match(name):
                yield name, item["LastModified"].timestamp()

    def remove_partials(self, older_than: float) -> int:
        return 0  # a PUT is atomic: an object is either whole or absent

    @property
    def owners_location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}{OWNERS_SUFFIX}/"

    def owners(self) -> dict[str, str]:
        folder = f"{self.prefix}{OWNERS_SUFFIX}/"
        keys = [item["Key"] for item in self._list(folder)]
        with self._errors():
            return {key[len(folder):]: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()
                    for key in keys}

    def add_owner(self, store_id: str, fingerprint: str) -> None:
        self._ensure_bucket()
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{OWNERS_SUFFIX}/{store_id}",
                                   Body=fingerprint.encode())
