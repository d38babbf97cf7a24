"""What the page's images and downloads load: previews, results and uploads (revalidated each time), a
batch's results as one streamed zip, and the live events for the session's tenant."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone

from PIL import Image

from api.limits import body_limit
from api.web.zipstream import CHUNK, Entry, zip_chunks
from shared.storage import ObjectNotFound
from tests.support.apps import Api
from tests.web.webclient import Browser, browser, finish, new_key


def test_the_zip_holds_every_result_and_says_what_is_missing(web: Browser, api: Api) -> None:
    batch = web.submit().json()
    done = batch["job_ids"][:3]
    for job_id in done:
        finish(api, job_id)
    web.action(f"/web/jobs/{batch['job_ids'][3]}/cancel")
    answer = web.get(f"/web/batches/{batch['id']}/results.zip")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert (
        answer.headers["content-disposition"] == f'attachment; filename="batch-{batch["id"][:8]}-results.zip"'
    )
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive.testzip() is None
    names = archive.namelist()
    assert [n[:4] for n in names] == ["001_", "002_", "003_", "README.txt"[:4]] and names[-1] == "README.txt"
    assert all(n.endswith(".png") for n in names[:3])
    for name, job_id in zip(names[:3], done, strict=True):
        assert archive.read(name) == web.get(f"/web/jobs/{job_id}/result").content
    readme = archive.read("README.txt").decode()
    assert f"004 (job {batch['job_ids'][3]}): canceled, no result" in readme


def test_the_zip_is_written_as_it_streams() -> None:
    """Chunks of at most CHUNK bytes (plus headers) come out one entry at a time: the archive is never
    held whole; a missing object is left out and named."""
    sizes = [3 * CHUNK + 17, CHUNK, 5]
    read: list[int] = []

    def reader(i: int) -> bytes:
        read.append(i)
        if i == 1:
            raise ObjectNotFound("gone")
        return bytes([i]) * sizes[i]

    when = datetime(2026, 1, 2, 3, 4, 6, tzinfo=timezone.utc)

    def read_of(i: int) -> Callable[[], bytes]:
        return lambda: reader(i)

    entries = (Entry(f"{i}.png", read_of(i), when) for i in range(3))
    stream = zip_chunks(entries, lambda missing: f"missing: {missing}")
    first = next(stream)
    assert read == [0] and 0 < len(first) <= CHUNK + 200  # the first entry's header and chunk only
    chunks = [first, *stream]
    assert max(len(c) for c in chunks) <= CHUNK + 200 and len(chunks) >= 4
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert archive.namelist() == ["0.png", "2.png", "README.txt"]
    assert archive.read("0.png") == bytes([0]) * sizes[0]
    assert archive.read("README.txt") == b"missing: ['1.png']"
    assert archive.getinfo("0.png").date_time == (2026, 1, 2, 3, 4, 6)  # DOS time: even seconds


def test_images_are_inline_and_revalidated_each_time(web: Browser, api: Api) -> None:
    job_id = web.submit(contents=1, styles=1).json()["job_ids"][0]
    assert web.get(f"/web/jobs/{job_id}/result").status_code == 409  # not finished
    finish(api, job_id)
    for path in (f"/web/jobs/{job_id}/result", f"/web/jobs/{job_id}/checkpoints/6/preview"):
        answer = web.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", path
        assert answer.headers["content-disposition"] == "inline"
        assert answer.headers["cache-control"] == "private, no-cache"
        etag = answer.headers["etag"]
        assert web.get(path, headers={"If-None-Match": etag}).status_code == 304
    download = web.get(f"/web/jobs/{job_id}/result", params={"download": "true"})
    assert download.headers["content-disposition"] == f'attachment; filename="{job_id}.png"'
    assert web.get(f"/web/jobs/{job_id}/checkpoints/1/preview").status_code == 200  # seq: older links
    assert web.get(f"/web/jobs/{job_id}/checkpoints/7/preview").status_code == 404
    assert web.get("/web/images/not-an-id").status_code == 404


def test_thumbnails_are_small_jpegs_served_as_previews_are(web: Browser, api: Api) -> None:
    new, old = web.submit(contents=2, styles=1).json()["job_ids"]
    assert web.get(f"/web/jobs/{new}/result/thumb").status_code == 409  # not finished
    finish(api, new, thumbs=True)
    finish(api, old)  # finished by an earlier version: no thumbnails
    for path in (f"/web/jobs/{new}/result/thumb", f"/web/jobs/{new}/checkpoints/6/thumb"):
        answer = web.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg", path
        assert answer.headers["content-disposition"] == "inline"
        assert answer.headers["cache-control"] == "private, no-cache"
        assert web.get(path, headers={"If-None-Match": answer.headers["etag"]}).status_code == 304
        assert max(Image.open(io.BytesIO(answer.content)).size) <= 256
    assert web.get(f"/web/jobs/{new}/checkpoints/7/thumb").status_code == 404
    no_thumb = web.get(f"/web/jobs/{old}/result/thumb")
    assert no_thumb.status_code == 404 and no_thumb.json()["error"]["code"] == "object_missing"
    no_thumb = web.get(f"/web/jobs/{old}/checkpoints/6/thumb")
    assert no_thumb.status_code == 404 and no_thumb.json()["error"]["code"] == "checkpoint_not_found"
    assert web.get(f"/web/jobs/{old}/checkpoints/6/preview").status_code == 200  # its full preview
    bob = browser(api)
    bob.sign_in(new_key(api, "bob"))
    for path in (f"/web/jobs/{new}/result/thumb", f"/web/jobs/{new}/checkpoints/6/thumb"):
        refused = bob.get(path)  # another tenant's job, even with a cached copy's ETag
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "job_not_found", path
        assert browser(api).get(path).status_code == 401  # signed out


def test_signed_out_images_and_streams_are_refused(web: Browser, api: Api) -> None:
    job_id = web.submit(contents=1, styles=1).json()["job_ids"][0]
    finish(api, job_id)
    etag = web.get(f"/web/jobs/{job_id}/result").headers["etag"]
    stranger = browser(api)
    answer = stranger.get(f"/web/jobs/{job_id}/result", headers={"If-None-Match": etag})
    assert answer.status_code == 401  # a cached copy is never confirmed to a signed-out browser
    assert stranger.get(f"/web/jobs/{job_id}/events").status_code == 401


def test_the_batch_stream_is_the_apis_for_the_session(web: Browser, api: Api) -> None:
    batch = web.submit().json()
    for job_id in batch["job_ids"]:
        finish(api, job_id, thumbs=job_id == batch["job_ids"][1])
    with web.client.stream("GET", f"/web/batches/{batch['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert text.count("event: status") == 4 and "event: completed" in text
    assert f'"result_url":"/v1/jobs/{batch["job_ids"][0]}/result"' in text  # the API's own data
    thumbed = batch["job_ids"][1]  # the page's script shows these (api/web/static/common.js SQ.thumb)
    assert f'"result_thumb_url":"/v1/jobs/{thumbed}/result/thumb"' in text
    assert f'"thumb_url":"/v1/jobs/{thumbed}/checkpoints/6/thumb"' in text
    assert '"result_thumb_url":null' in text  # the others: none, the page shows their full result


def test_the_page_submit_takes_as_many_bytes_as_the_api(api: Api) -> None:
    settings = api.settings
    ctype = "multipart/form-data; boundary=x"
    assert body_limit(settings, "/web/batches", ctype) == body_limit(settings, "/v1/batches", ctype)
