"""POST/GET /v1/jobs, listing with cursors, cancellation, results, tenant isolation."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import update

from shared.db import session_scope
from shared.models import Job
from shared.settings import Settings
from tests.support.apps import Api, submit, upload
from tests.support.images import image_bytes
from tests.support.servers import S3Endpoint


def _set(api: Api, job_id: str, **values: object) -> None:
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_submit_and_read_a_job(any_api: Api) -> None:
    r = submit(
        any_api.client,
        content=image_bytes(),
        styles=[image_bytes(), image_bytes()],
        params={"size": 256, "style_weights": [1, 2]},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["attempts"] == 0 and job["error"] is None
    assert job["params"]["size"] == 256 and len(job["style_ids"]) == 2
    assert any_api.publisher.published == [job["id"]]
    got = any_api.client.get(f"/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["result_url"] is None and got["checkpoints"] == []
    assert got["created_at"].endswith(("+00:00", "Z"))


def test_submit_by_image_ids(api: Api) -> None:
    c, s = upload(api.client, image_bytes()).json(), upload(api.client, image_bytes()).json()
    before = api.counts()
    r = submit(api.client, data={"content_id": c["id"], "style_id": [s["id"]]})
    assert r.status_code == 202, r.text
    assert r.json()["content_id"] == c["id"] and r.json()["style_ids"] == [s["id"]]
    after = api.counts()
    assert after["images"] == before["images"] and after["objects"] == before["objects"]


def test_progress_checkpoints_and_result_links_on_folder_storage(api: Api) -> None:
    job = submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()
    progress = {
        "scale": 2,
        "scales": 5,
        "iteration": 40,
        "iterations": 200,
        "fraction": 0.31,
        "loss": 12.5,
        "eta_seconds": 33.0,
        "step": 9,
        "total_steps": 99,
    }
    key, preview = f"jobs/{job['id']}/checkpoints/3.pt", f"jobs/{job['id']}/checkpoints/3.png"
    api.storage.put_bytes(key, b"torch-bytes")
    api.storage.put_bytes(preview, image_bytes())
    api.storage.put_bytes(f"jobs/{job['id']}/result.png", b"\x89PNG-result")
    cp = {"key": key, "preview_key": preview, "scale": 1, "iteration": 150, "step": 3, "at": "x"}
    _set(api, job["id"], status="running", progress=progress, checkpoints=[cp], attempt=1)
    got = api.client.get(f"/v1/jobs/{job['id']}").json()
    assert got["progress"] == {k: progress[k] for k in got["progress"]}
    (c,) = got["checkpoints"]
    assert (c["scale"], c["iteration"], c["step"]) == (1, 150, 3)
    assert c["url"].endswith(f"/v1/jobs/{job['id']}/checkpoints/3")  # named by its step
    assert api.client.get(c["url"]).content == b"torch-bytes"
    # a link of an older release named it by its seq (0 here: stored without one): still served
    assert api.client.get(f"/v1/jobs/{job['id']}/checkpoints/0").content == b"torch-bytes"
    assert api.client.get(c["preview_url"]).headers["content-type"] == "image/png"
    assert api.client.get(f"/v1/jobs/{job['id']}/checkpoints/5").status_code == 404
    r = api.client.get(f"/v1/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.json()["error"]["status"] == "running"
    _set(api, job["id"], status="succeeded", result_key=f"jobs/{job['id']}/result.png")
    got = api.client.get(f"/v1/jobs/{job['id']}").json()
    r = api.client.get(got["result_url"])
    assert r.status_code == 200 and r.content == b"\x89PNG-result"
    assert r.headers["content-type"] == "image/png"


def test_thumbnail_links_and_none_for_jobs_of_earlier_versions(api: Api) -> None:
    new, old = (submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()["id"] for _ in "ab")
    for job_id in (new, old):
        api.storage.put_bytes(f"jobs/{job_id}/result.a1.png", image_bytes())
    api.storage.put_bytes(f"jobs/{new}/result.a1.thumb.jpg", b"jpeg-result", "image/jpeg")
    api.storage.put_bytes(f"jobs/{new}/checkpoints/3.thumb.jpg", b"jpeg-checkpoint", "image/jpeg")
    cp = {"key": f"jobs/{new}/checkpoints/3.pt", "preview_key": f"jobs/{new}/checkpoints/3.png", "step": 3}
    thumbed = {**cp, "thumb_key": f"jobs/{new}/checkpoints/3.thumb.jpg"}
    _set(api, new, status="running", attempt=1, checkpoints=[thumbed])
    assert api.client.get(f"/v1/jobs/{new}/result/thumb").status_code == 409  # no result yet
    execution = {"device": "cpu", "result_thumb_key": f"jobs/{new}/result.a1.thumb.jpg"}
    _set(api, new, status="succeeded", result_key=f"jobs/{new}/result.a1.png", execution=execution)
    _set(api, old, status="succeeded", attempt=1, result_key=f"jobs/{old}/result.a1.png", checkpoints=[cp])
    got = api.client.get(f"/v1/jobs/{new}").json()
    assert got["result_thumb_url"] == f"/v1/jobs/{new}/result/thumb"
    assert got["checkpoints"][0]["thumb_url"] == f"/v1/jobs/{new}/checkpoints/3/thumb"
    assert got["execution"]["device"] == "cpu" and "result_thumb_key" not in got["execution"]
    for link, body in ((got["result_thumb_url"], b"jpeg-result"), (got["checkpoints"][0]["thumb_url"], None)):
        r = api.client.get(link)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", link
        assert body is None or r.content == body
    legacy = api.client.get(f"/v1/jobs/{old}").json()
    assert legacy["result_thumb_url"] is None and legacy["checkpoints"][0]["thumb_url"] is None
    assert legacy["result_url"] == f"/v1/jobs/{old}/result"
    r = api.client.get(f"/v1/jobs/{old}/result/thumb")
    assert r.status_code == 404 and r.json()["error"]["code"] == "object_missing"
    r = api.client.get(f"/v1/jobs/{old}/checkpoints/3/thumb")
    assert r.status_code == 404 and r.json()["error"]["code"] == "checkpoint_not_found"


def test_result_redirects_to_presigned_url_on_s3(
    settings_factory: Callable[..., Settings],
    s3: S3Endpoint,
) -> None:
    from tests.support.apps import build_api

    api = build_api(settings_factory(storage_url=s3.storage_url, s3_endpoint_url=s3.endpoint_url))
    job = submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()
    key = f"jobs/{job['id']}/result.png"
    api.storage.put_bytes(key, b"png!", "image/png")
    _set(api, job["id"], status="succeeded", result_key=key)
    got = api.client.get(f"/v1/jobs/{job['id']}").json()
    assert "X-Amz-Expires=3600" in got["result_url"]
    assert got["result_thumb_url"] is None  # a job of an earlier version: no thumbnail
    _set(api, job["id"], execution={"result_thumb_key": f"jobs/{job['id']}/result.a1.thumb.jpg"})
    assert "X-Amz-Signature" in api.client.get(f"/v1/jobs/{job['id']}").json()["result_thumb_url"]
    r = api.client.get(f"/v1/jobs/{job['id']}/result", follow_redirects=False)
    assert r.status_code == 307 and "X-Amz-Signature" in r.headers["location"]
    import httpx

    assert httpx.get(r.headers["location"]).content == b"png!"


def test_cursor_pagination_has_no_duplicates_or_misses(any_api: Api) -> None:
    c = upload(any_api.client, image_bytes()).json()["id"]
    r = any_api.client.post("/v1/batches", json={"contents": [c] * 7, "styles": [c]})
    ids = set(r.json()["job_ids"])
    single = submit(any_api.client, data={"content_id": c, "style_id": c}).json()["id"]
    ids.add(single)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = any_api.client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 8 and set(seen) == ids
    assert seen[0] == single  # newest first
    only_batch = any_api.client.get("/v1/jobs", params={"batch_id": r.json()["id"]}).json()
    assert [j["id"] for j in only_batch["items"]] == list(reversed(r.json()["job_ids"]))
    assert any_api.client.get("/v1/jobs", params={"limit": 201}).status_code == 422
    assert any_api.client.get("/v1/jobs", params={"cursor": "garbage"}).status_code == 422
    assert any_api.client.get("/v1/jobs", params={"status": "nope"}).status_code == 422
    assert len(any_api.client.get("/v1/jobs?status=queued").json()["items"]) == 8


def test_cancel_queued_running_and_finished(any_api: Api) -> None:
    c = upload(any_api.client, image_bytes()).json()["id"]
    ids = any_api.client.post("/v1/batches", json={"contents": [c] * 3, "styles": [c]}).json()
    queued, running, done = ids["job_ids"]
    r = any_api.client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["finished_at"] is not None
    _set(any_api, running, status="running", attempt=1)
    r = any_api.client.post(f"/v1/jobs/{running}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    _set(any_api, done, status="succeeded")
    r = any_api.client.post(f"/v1/jobs/{done}/cancel")
    assert r.status_code == 409 and r.json()["error"]["status"] == "succeeded"
    r = any_api.client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 409 and r.json()["error"]["status"] == "canceled"
    assert any_api.client.post("/v1/jobs/nope/cancel").status_code == 404


def test_tenant_isolation(any_api: Api) -> None:
    img = upload(any_api.client, image_bytes()).json()["id"]
    job = submit(any_api.client, data={"content_id": img, "style_id": img}).json()["id"]
    batch = any_api.client.post("/v1/batches", json={"contents": [img], "styles": [img]}).json()
    bob = any_api.as_tenant("bob")
    for path in (
        f"/v1/jobs/{job}",
        f"/v1/batches/{batch['id']}",
        f"/v1/images/{img}",
        f"/v1/jobs/{job}/result",
    ):
        r = bob.get(path)
        assert r.status_code == 404, path
        assert set(r.json()["error"]) >= {"code", "message"}
    assert bob.post(f"/v1/jobs/{job}/cancel").status_code == 404
    assert bob.get("/v1/jobs").json()["items"] == []
    assert bob.get("/v1/jobs", params={"batch_id": batch["id"]}).json()["items"] == []
    r = submit(bob, data={"content_id": img, "style_id": img})  # an id bob never uploaded
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_image"
    # Uploading the same bytes makes it bob's too (201 for him), with nothing stored again.
    before = any_api.counts()["objects"]
    assert upload(bob, any_api.storage.get_bytes(f"images/{img}")).status_code == 201
    assert any_api.counts()["objects"] == before
    assert len(any_api.client.get("/v1/jobs").json()["items"]) == 2


def test_auth_is_required(api: Api) -> None:
    from fastapi.testclient import TestClient

    anon = TestClient(api.client.app)
    r = anon.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = anon.get("/v1/jobs", headers={"Authorization": "Bearer sq_wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert anon.get("/healthz").status_code == 200


def test_auth_off_uses_the_local_tenant(settings_factory: Callable[..., Settings]) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.support.apps import FakePublisher

    app = create_app(settings_factory(auth="off"), publisher=FakePublisher())
    anon = TestClient(app, client=("127.0.0.1", 50000))  # auth=off serves loopback clients only
    assert submit(anon, content=image_bytes(), styles=[image_bytes()]).status_code == 202
    assert len(anon.get("/v1/jobs").json()["items"]) == 1
    assert app.state.local_tenant.name == "local"


def test_image_upload_is_idempotent(api: Api) -> None:
    data = image_bytes(80, 60, "JPEG")
    first = upload(api.client, data)
    assert first.status_code == 201
    assert first.json() | {"id": "-"} == {
        "id": "-",
        "format": "JPEG",
        "width": 80,
        "height": 60,
        "bytes": len(data),
    }
    counts = api.counts()
    again = upload(api.client, data)
    assert again.status_code == 200 and again.json() == first.json()
    assert api.counts() == counts
    assert api.client.get(f"/v1/images/{first.json()['id']}").json() == first.json()
