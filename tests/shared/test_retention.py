"""shared.retention: results past retention (410), images counted by the job rows naming them, the
grace of unused uploads, the race with a submission, and the orphan sweep on folder storage and S3."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import jobstore
from shared.db import get_sessionmaker, session_scope
from shared.jobstore_deletion import StopCounts, mark_deleted
from shared.models import Job, StoredImage, TenantImage, utcnow
from shared.orphans import sweep_orphans
from shared.purge import purge_once
from shared.retention import BATCH, job_keys
from shared.settings import Settings
from shared.storage import FolderStorage, StorageError
from shared.storage_keys import RESULT_THUMB_FIELD
from shared.storage_s3 import S3Storage
from tests.support.apps import Api, build_api, submit, upload
from tests.support.images import image_bytes
from tests.support.servers import S3Endpoint

NOW = utcnow()
DAY = timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Api:
    if request.param == "sqlite":
        return build_api(settings_factory())
    return build_api(settings_factory(database_url=request.getfixturevalue("pg_url")))


@pytest.fixture
def store(tmp_path: Path) -> FolderStorage:
    return FolderStorage(tmp_path / "objects")


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)


def _finish(
    api: Api, job_id: str, finished_at: datetime, status: str = "succeeded", *, thumbs: bool = True
) -> list[str]:
    """The job finished as a worker leaves it; ``thumbs=False``: as an earlier version did (no
    thumbnails, none named)."""
    keys = [
        f"jobs/{job_id}/result.a1.png",
        f"jobs/{job_id}/checkpoints/2.pt",
        f"jobs/{job_id}/checkpoints/2.png",
    ]
    thumb_keys = [f"jobs/{job_id}/result.a1.thumb.jpg", f"jobs/{job_id}/checkpoints/2.thumb.jpg"]
    keys += thumb_keys if thumbs else []
    for key in keys:
        api.storage.put_bytes(key, b"x")
    refs: list[dict[str, Any]] = [{"key": keys[1], "preview_key": keys[2], "step": 2, "seq": 0}]
    if thumbs:
        refs[0]["thumb_key"] = thumb_keys[1]
    with session_scope(api.settings.database_url) as session:
        values: dict[str, Any] = {"result_key": keys[0]} if status == "succeeded" else {"error_code": "boom"}
        if thumbs and status == "succeeded":
            values["execution"] = {RESULT_THUMB_FIELD: thumb_keys[0]}
        done = update(Job).where(Job.id == job_id)
        session.execute(
            done.values(status=status, attempt=1, checkpoints=refs, finished_at=finished_at, **values)
        )
    return keys


def test_results_past_retention_are_deleted_and_answer_410(app: Api) -> None:
    old, new, failed = (
        submit(app.client, content=image_bytes(), styles=[image_bytes()]).json() for _ in range(3)
    )
    old_keys = _finish(app, old["id"], NOW - 31 * DAY)
    new_keys = _finish(app, new["id"], NOW - 29 * DAY)
    failed_keys = _finish(app, failed["id"], NOW - 40 * DAY, status="failed", thumbs=False)
    assert len(old_keys) == 5 and len(failed_keys) == 3  # with thumbnails / of an earlier version
    sessions = get_sessionmaker(app.settings.database_url)
    report = purge_once(sessions, app.storage, app.settings)
    assert sorted(report.expired) == sorted([old["id"], failed["id"]]) and report.emptied == []
    stored = set(app.storage.list_keys())
    assert not stored & {*old_keys, *failed_keys} and set(new_keys) <= stored
    for path in ("result", "result/thumb", "checkpoints/0", "checkpoints/0/preview", "checkpoints/0/thumb"):
        r = app.client.get(f"/v1/jobs/{old['id']}/{path}")
        assert r.status_code == 410 and r.json()["error"]["code"] == "result_expired", (path, r.text)
    view = app.client.get(f"/v1/jobs/{old['id']}").json()
    assert view["status"] == "succeeded" and view["error"]["code"] == "result_expired"
    assert view["result_url"] is None and view["checkpoints"] == []
    assert app.client.get(f"/v1/jobs/{failed['id']}").json()["error"]["code"] == "boom"
    assert app.client.get(f"/v1/jobs/{failed['id']}/result").status_code == 409
    assert app.client.get(f"/v1/jobs/{new['id']}/result").status_code == 200
    assert app.client.get(f"/v1/jobs/{new['id']}").json()["error"] is None
    assert purge_once(sessions, app.storage, app.settings).expired == []  # once
    assert f"images/{old['content_id']}" in stored  # the row, still shown, names its images
    never = app.settings.model_copy(update={"retention_days": 0})
    assert purge_once(sessions, app.storage, never, now=NOW + 400 * DAY).expired == []


def test_a_jobs_keys_are_its_objects_with_every_thumbnail() -> None:
    """Each attempt's result and thumbnail, each checkpoint's objects; a ref of an earlier version
    (no ``thumb_key``) names its two."""
    refs = [
        {"key": "jobs/j/checkpoints/2.pt", "preview_key": "jobs/j/checkpoints/2.png"},
        {"key": "jobs/j/checkpoints/4.pt", "preview_key": "jobs/j/checkpoints/4.png", "thumb_key": "t4"},
    ]
    assert job_keys("j", 2, {"output_format": "jpeg"}, "jobs/j/result.a2.jpg", refs) == {
        "jobs/j/result.a1.jpg",
        "jobs/j/result.a1.thumb.jpg",
        "jobs/j/result.a2.jpg",
        "jobs/j/result.a2.thumb.jpg",
        "jobs/j/checkpoints/2.pt",
        "jobs/j/checkpoints/2.png",
        "jobs/j/checkpoints/4.pt",
        "jobs/j/checkpoints/4.png",
        "t4",
    }
    # The orphan sweep's question (attempts unknown): what the row names, the result's thumbnail too.
    assert job_keys("j", 0, None, "jobs/j/result.a3.png", []) == {
        "jobs/j/result.a3.png",
        "jobs/j/result.a3.thumb.jpg",
    }


# -- images counted by the rows that name them (rows written directly) ------------------------------


def _image(
    session: Session, store: FolderStorage, name: str, *owners: str, at: datetime = NOW - 10 * DAY
) -> str:
    image_id = hashlib.sha256(name.encode()).hexdigest()
    store.put_bytes(f"images/{image_id}", name.encode())
    session.add(
        StoredImage(
            id=image_id,
            format="PNG",
            width=1,
            height=1,
            bytes=1,
            storage_key=f"images/{image_id}",
            created_at=at,
        )
    )
    session.flush()
    session.add_all([TenantImage(tenant_id=t, image_id=image_id, created_at=at) for t in owners])
    session.flush()
    return image_id


def _job(
    session: Session, tenant: str, content: str, styles: list[str], masks: list[str] | None = None, **kw: Any
) -> str:
    job = Job(tenant_id=tenant, content_image_id=content, style_image_ids=styles, mask_image_ids=masks, **kw)
    session.add(job)
    session.flush()
    return job.id


def _deleted(
    session: Session, tenant: str, content: str, styles: list[str], masks: list[str] | None = None
) -> str:
    """A job deleted two hours ago, finished and emptied: the next pass removes its row."""
    return _job(
        session,
        tenant,
        content,
        styles,
        masks,
        status="canceled",
        finished_at=NOW - 2 * DAY,
        deleted_at=NOW - timedelta(hours=2),
        emptied_at=utcnow(),
    )


def _images(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(StoredImage.id)))


def _owners(sessions: sessionmaker[Session]) -> set[tuple[str, str]]:
    with sessions() as session:
        return {(t, i) for t, i in session.execute(select(TenantImage.tenant_id, TenantImage.image_id))}


def _objects(store: FolderStorage) -> set[str]:
    return {k.removeprefix("images/") for k in store.list_keys("images/")}


def test_an_image_goes_when_no_row_names_it(
    sessions: sessionmaker[Session], store: FolderStorage, tmp_path: Path
) -> None:
    with sessions() as s:
        a, b, c, m1, m2, z = (_image(s, store, n, "t1") for n in ("a", "b", "c", "m1", "m2", "z"))
        shared = _image(s, store, "shared", "t1", "t2")  # content-addressed: both tenants uploaded it
        _deleted(s, "t1", a, [b, c, shared], [m1, m2, m1])
        _job(s, "t1", z, [b], [m1])  # live: names b as a style and m1 as a mask
        _job(s, "t2", shared, [z])  # another tenant's live job names the shared image
        s.commit()
    report = purge_once(sessions, store, _settings(tmp_path), now=NOW, scan_images=False)
    assert report.removed_jobs == 1 and sorted(report.removed_images) == sorted([a, c, m2])
    assert _images(sessions) == _objects(store) == {b, m1, z, shared}
    # t1's last job naming the shared image is gone: so is its ownership (t2's jobs keep the image)
    assert _owners(sessions) == {("t1", b), ("t1", m1), ("t1", z), ("t2", shared)}
    with sessions() as s:  # the other tenant deletes its job too: now nobody names the shared image
        s.execute(update(Job).where(Job.tenant_id == "t2").values(status="succeeded", deleted_at=NOW - DAY))
        s.execute(update(Job).where(Job.tenant_id == "t2").values(emptied_at=utcnow()))
        s.commit()
    report = purge_once(sessions, store, _settings(tmp_path), now=NOW, scan_images=False)
    assert report.removed_images == [shared] and shared not in _objects(store)
    assert not {o for o in _owners(sessions) if o[1] == shared}


def test_unused_uploads_are_kept_until_retention(
    sessions: sessionmaker[Session], store: FolderStorage, tmp_path: Path
) -> None:
    with sessions() as s:
        unused = _image(s, store, "unused", "t1")  # uploaded ten days ago, no job yet
        used = _image(s, store, "used", "t1")  # uploaded ten days ago, named by a job now removed
        also_t2 = _image(s, store, "also t2", "t1", "t2")  # t1 used it; t2 uploaded it, no job of t2 did
        _deleted(s, "t1", used, [also_t2])
        s.commit()
    settings = _settings(tmp_path)
    report = purge_once(sessions, store, settings, now=NOW)
    assert report.removed_jobs == 1 and report.removed_images == [used]
    assert _images(sessions) == _objects(store) == {unused, also_t2}
    assert _owners(sessions) == {("t1", unused), ("t2", also_t2)}
    assert purge_once(sessions, store, settings, now=NOW + 19 * DAY).removed_images == []
    never = settings.model_copy(update={"retention_days": 0})
    assert purge_once(sessions, store, never, now=NOW + 400 * DAY).removed_images == []
    later = purge_once(sessions, store, settings, now=NOW + 21 * DAY)  # thirty days after the uploads
    assert sorted(later.removed_images) == sorted([unused, also_t2])
    assert _images(sessions) == _objects(store) == set() and _owners(sessions) == set()


def test_a_submission_holding_the_image_wins_the_race(
    sessions: sessionmaker[Session], store: FolderStorage, tmp_path: Path
) -> None:
    if sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("row locks: PostgreSQL")
    with sessions() as s:
        image = _image(s, store, "raced", "t1")
        _deleted(s, "t1", image, [image])
        s.commit()
    result: list[Any] = []
    with sessions() as submission:  # a job naming the image, written but not committed: a key-share lock
        _job(submission, "t1", image, [image])
        worker = threading.Thread(
            target=lambda: result.append(purge_once(sessions, store, _settings(tmp_path), now=NOW)),
            daemon=True,  # (were it to wait for the lock, leaving this block rolls the submission back)
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the purge waited for the submission"
        assert result[0].removed_jobs == 1 and result[0].removed_images == []  # skipped, not deleted
        submission.commit()
    assert purge_once(sessions, store, _settings(tmp_path), now=NOW).removed_images == []  # named now
    assert _images(sessions) == _objects(store) == {image}


def test_a_pass_is_bounded(sessions: sessionmaker[Session], store: FolderStorage, tmp_path: Path) -> None:
    with sessions() as s:
        image = _image(s, store, "many", "t1")
        for _ in range(BATCH + 3):
            _job(s, "t1", image, [image], status="succeeded", finished_at=NOW, deleted_at=NOW)
        s.commit()
    settings = _settings(tmp_path)
    assert len(purge_once(sessions, store, settings, now=NOW).emptied) == BATCH
    assert len(purge_once(sessions, store, settings, now=NOW).emptied) == 3
    later = NOW + timedelta(hours=2)
    assert purge_once(sessions, store, settings, now=later).removed_jobs == BATCH
    last = purge_once(sessions, store, settings, now=later)
    assert last.removed_jobs == 3 and last.removed_images == [image]


def test_a_deleted_job_given_back_to_the_queue_ends_canceled(
    sessions: sessionmaker[Session], store: FolderStorage, tmp_path: Path
) -> None:
    with sessions() as s:
        image = _image(s, store, "img", "t1")
        job_id = _job(s, "t1", image, [image], status="running", attempt=1)
        s.commit()
        assert mark_deleted(s, "t1", job_id=job_id) == StopCounts(0, 1, 0)
        assert mark_deleted(s, "t1", job_id=job_id) == StopCounts(0, 0, 0)  # hidden already
        assert jobstore.release(s, job_id, 1, graceful=True)  # its worker shut down meanwhile
        s.commit()
    report = purge_once(sessions, store, _settings(tmp_path))
    assert report.canceled == 1 and report.emptied == [job_id]
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "canceled"


# -- the orphan sweep: storage ends with exactly the objects rows name -------------------------------


def _named_keys(api: Api) -> set[str]:
    with session_scope(api.settings.database_url) as session:
        keys = set(session.scalars(select(StoredImage.storage_key)))
        for result, refs, ran in session.execute(select(Job.result_key, Job.checkpoints, Job.execution)):
            keys |= {result, (ran or {}).get(RESULT_THUMB_FIELD)} - {None} if result else set()
            keys |= {ref[f] for ref in refs or [] for f in ("key", "preview_key", "thumb_key") if ref.get(f)}
    return keys


@pytest.fixture(params=["folder", "s3"])
def swept(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Iterator[Api]:
    if request.param == "folder":
        yield build_api(settings_factory())
        return
    s3: S3Endpoint = request.getfixturevalue("s3")
    api = build_api(settings_factory(storage_url=s3.storage_url, s3_endpoint_url=s3.endpoint_url))
    assert isinstance(api.storage, S3Storage)
    yield api


def test_after_deletes_purges_and_a_sweep_only_named_objects_remain(swept: Api) -> None:
    api, later = swept, NOW + timedelta(hours=2)
    upload(api.client, image_bytes())  # an upload no job used yet: kept
    jobs = [submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()["id"] for _ in range(4)]
    for job_id in jobs:
        _finish(api, job_id, NOW)
    strays = [f"jobs/{jobs[0]}/result.a0.png", f"jobs/{uuid.uuid4()}/result.a1.png", "images/" + "f" * 64]
    for key in strays:  # an attempt's result, a removed job's file, an image whose commit failed
        api.storage.put_bytes(key, b"stray")
    assert api.client.delete(f"/v1/jobs/{jobs[1]}").status_code == 204
    _finish(api, jobs[2], NOW)
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == jobs[2]).values(status="running"))
    assert api.client.delete(f"/v1/jobs/{jobs[2]}").status_code == 202
    with session_scope(api.settings.database_url) as session:
        assert jobstore.cancel(session, jobs[2], 1)
    sessions = get_sessionmaker(api.settings.database_url)
    purge_once(sessions, api.storage, api.settings)
    removed = purge_once(sessions, api.storage, api.settings, now=later)
    assert removed.removed_jobs == 2 and len(removed.removed_images) == 4
    assert set(api.storage.list_keys()) - _named_keys(api) == set(strays)
    hour = timedelta(hours=1)
    assert sweep_orphans(sessions, api.storage, older_than=hour) == 0  # too young to be orphans
    assert sweep_orphans(sessions, api.storage, older_than=hour, now=later, limit=1) == 1
    assert sweep_orphans(sessions, api.storage, older_than=hour, now=later) == 2
    assert set(api.storage.list_keys()) == _named_keys(api)
    # The two jobs kept: result, checkpoint, preview and both thumbnails each.
    assert len({k for k in _named_keys(api) if k.startswith("jobs/")}) == 2 * 5


def test_listing_and_bulk_deletes_on_both_backends(swept: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    store = swept.storage
    monkeypatch.setattr("shared.storage_s3.S3_DELETE_MAX", 2)  # S3: several DeleteObjects requests
    keys = [f"jobs/j{i}/result.a1.png" for i in range(5)] + ["images/" + "a" * 64, "other/x"]
    for key in keys:
        store.put_bytes(key, b"x")
    listed = list(store.list_objects("jobs/"))
    assert [o.key for o in listed] == keys[:5]
    assert all(NOW - timedelta(minutes=5) < o.modified < utcnow() + timedelta(minutes=5) for o in listed)
    assert [o.key for o in store.list_objects("jobs/j1")] == ["jobs/j1/result.a1.png"]
    assert list(store.list_objects("nothing/")) == []
    with pytest.raises(StorageError):
        list(store.list_objects("../"))
    assert store.delete_many([*keys[:5], "jobs/missing/x"]) == 6
    assert sorted(store.list_keys()) == sorted(keys[5:])


def test_a_submission_checking_an_image_id_holds_it(
    sessions: sessionmaker[Session], store: FolderStorage, tmp_path: Path
) -> None:
    """A style or mask named by id is read FOR KEY SHARE (api.imagestore.check_owned): a purge
    running before that submission commits skips the image instead of deleting it under it."""
    from api.imagestore import check_owned

    if sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("row locks: PostgreSQL")
    with sessions() as s:
        image = _image(s, store, "checked", "t1")
        _deleted(s, "t1", image, [image])
        s.commit()
    result: list[Any] = []
    with sessions() as submission:
        assert image in check_owned(submission, "t1", [image])
        worker = threading.Thread(
            target=lambda: result.append(purge_once(sessions, store, _settings(tmp_path), now=NOW)),
            daemon=True,
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the purge waited for the submission"
        assert result[0].removed_images == []  # skipped while the submission holds it
        submission.rollback()
    assert _images(sessions) == _objects(store) == {image}  # row and object both still there
