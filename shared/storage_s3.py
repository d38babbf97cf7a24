"""The S3-compatible backend of ``shared.storage``: ``S3Storage``, every key under a prefix.

boto3 with SigV4, path-style addressing when ``settings.s3_endpoint_url`` is set (MinIO, moto...),
short timeouts and a few retries; ``url_for`` is a presigned GET, signed for
``settings.s3_public_endpoint_url`` when set (the address clients outside the servers' network use:
signing needs no request, so the API never has to reach that address itself). boto3's errors
become the storage errors of ``shared.storage`` (``ObjectNotFound``, ``StorageUnavailable``,
``StorageError``). ``shared.storage.open_storage`` builds one for an ``s3://bucket/prefix`` URL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from shared.settings import Settings
from shared.storage import (
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    StoredObject,
    clean_key,
    clean_prefix,
)

S3_DELETE_MAX = 1000  # keys per DeleteObjects request (the S3 limit)


class S3Storage:
    """An S3-compatible bucket, every key under ``prefix``."""

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region,
            config=config,
        )
        # SigV4 signs the Host header: a link for clients elsewhere is signed for the host they use.
        public = settings.s3_public_endpoint_url
        self.link_client: Any = (
            boto3.client("s3", endpoint_url=public, region_name=settings.s3_region, config=config)
            if public
            else self.client
        )

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if err.get("Code") in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise ObjectNotFound(key) from exc
            if status >= 500 or err.get("Code") in ("SlowDown", "ServiceUnavailable"):
                raise StorageUnavailable(f"S3 {op} {key}: {err.get('Code')}") from exc
            raise StorageError(f"S3 {op} {key}: {err.get('Code')} {err.get('Message')}") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, DNS...
            raise StorageUnavailable(f"S3 {op} {key}: {exc}") from exc

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._call("put_object", key, Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def get_bytes(self, key: str) -> bytes:
        resp = self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))
        try:
            return bytes(resp["Body"].read())
        finally:
            resp["Body"].close()

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Bucket=self.bucket, Key=self._key(key))

    def url_for(self, key: str, *, expires_s: int) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        url = self.link_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return str(url)

    def check(self) -> None:
        try:
            self._call("head_bucket", "", Bucket=self.bucket)
        except ObjectNotFound as exc:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist") from exc
        except StorageError as exc:
            raise StorageUnavailable(str(exc)) from exc

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (for tests and maintenance; not part of ``Storage``)."""
        return (obj.key for obj in self.list_objects(prefix))

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``, in key order, one page at a time."""
        prefix = clean_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        more: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", prefix, Bucket=self.bucket, Prefix=full, **more)
            for obj in page.get("Contents", []):
                yield StoredObject(obj["Key"][strip:], obj["LastModified"])
            if not page.get("IsTruncated"):
                return
            more = {"ContinuationToken": page["NextContinuationToken"]}

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete every key (missing ones too), up to 1000 per request; returns how many were asked
        for. Raises ``StorageError`` naming the first key the bucket refused."""
        for start in range(0, len(keys), S3_DELETE_MAX):
            chunk = [{"Key": self._key(k)} for k in keys[start : start + S3_DELETE_MAX]]
            resp = self._call(
                "delete_objects",
                chunk[0]["Key"],
                Bucket=self.bucket,
                Delete={"Objects": chunk, "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 delete_objects: {len(errors)} refused, {first.get('Key')}: {first.get('Code')}"
                )
        return len(keys)


__all__ = ["S3_DELETE_MAX", "S3Storage"]
