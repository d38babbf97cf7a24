"""Storage: the folder backend and the S3 backend on a real (moto) HTTP endpoint."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from shared.settings import Settings
from shared.storage import (
    FolderStorage,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    open_storage,
)
from shared.storage_s3 import S3Storage
from tests.support.servers import S3Endpoint


def test_folder_round_trip_and_atomic_write(tmp_path: Path) -> None:
    store = FolderStorage(tmp_path / "root")
    store.check()
    store.put_bytes("jobs/j1/result.png", b"abc", "image/png")
    assert store.get_bytes("jobs/j1/result.png") == b"abc"
    assert store.exists("jobs/j1/result.png")
    store.put_bytes("jobs/j1/result.png", b"xyz")  # overwrite via os.replace
    assert store.get_bytes("jobs/j1/result.png") == b"xyz"
    assert list(store.list_keys()) == ["jobs/j1/result.png"]  # no temp files left behind
    assert store.url_for("jobs/j1/result.png", expires_s=60) is None
    store.delete("jobs/j1/result.png")
    store.delete("jobs/j1/result.png")  # idempotent
    assert not store.exists("jobs/j1/result.png")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("jobs/j1/result.png")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "a/./b"])
def test_folder_refuses_keys_escaping_the_root(tmp_path: Path, key: str) -> None:
    store = FolderStorage(tmp_path)
    with pytest.raises(StorageError):
        store.put_bytes(key, b"x")
    assert not (tmp_path.parent / "x").exists()


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    folder = open_storage(Settings(data_dir=tmp_path))
    assert isinstance(folder, FolderStorage)
    assert folder.root == (tmp_path / "storage").resolve()
    with pytest.raises(StorageError):
        open_storage(Settings(data_dir=tmp_path, storage_url="ftp://x/y"))


def _s3(s3: S3Endpoint, tmp_path: Path) -> S3Storage:
    settings = Settings(data_dir=tmp_path, storage_url=s3.storage_url, s3_endpoint_url=s3.endpoint_url)
    store = open_storage(settings)
    assert isinstance(store, S3Storage)
    return store


def test_s3_round_trip(s3: S3Endpoint, tmp_path: Path) -> None:
    store = _s3(s3, tmp_path)
    store.check()
    assert not store.exists("images/abc")
    store.put_bytes("images/abc", b"\x89PNG data", "image/png")
    assert store.exists("images/abc")
    assert store.get_bytes("images/abc") == b"\x89PNG data"
    assert list(store.list_keys()) == ["images/abc"]
    store.delete("images/abc")
    assert not store.exists("images/abc")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("images/abc")


def test_s3_presigned_url_over_real_http(s3: S3Endpoint, tmp_path: Path) -> None:
    store = _s3(s3, tmp_path)
    store.put_bytes("jobs/j1/result.png", b"result-bytes", "image/png")
    url = store.url_for("jobs/j1/result.png", expires_s=123)
    assert url is not None
    query = parse_qs(urlparse(url).query)
    assert query["X-Amz-Expires"] == ["123"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert urlparse(url).path == f"/{s3.bucket}/stylequeue/jobs/j1/result.png"  # path style
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.content == b"result-bytes"
    assert resp.headers["content-type"] == "image/png"


def test_s3_links_are_signed_for_the_public_endpoint(s3: S3Endpoint, tmp_path: Path) -> None:
    # The servers reach S3 at its internal address; clients get links for the public one (here the
    # same moto server under another host name), and only url_for uses it.
    public = s3.endpoint_url.replace("127.0.0.1", "localhost")
    settings = Settings(
        data_dir=tmp_path,
        storage_url=s3.storage_url,
        s3_endpoint_url=s3.endpoint_url,
        s3_public_endpoint_url=public,
    )
    store = open_storage(settings)
    store.put_bytes("jobs/j1/result.png", b"result-bytes", "image/png")
    url = store.url_for("jobs/j1/result.png", expires_s=60)
    assert url is not None and url.startswith(public + "/")
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.content == b"result-bytes"


def test_s3_unreachable_is_storage_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.servers import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = Settings(
        data_dir=tmp_path, storage_url="s3://nope/p", s3_endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    store = open_storage(settings)
    with pytest.raises(StorageUnavailable):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.get_bytes("images/x")


def test_s3_missing_bucket_is_unavailable(s3: S3Endpoint, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, storage_url="s3://no-such-bucket/p", s3_endpoint_url=s3.endpoint_url
    )
    with pytest.raises(StorageUnavailable):
        open_storage(settings).check()
