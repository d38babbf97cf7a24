"""Submissions record each job's bucket (shared.buckets) from its content's stored size."""

from __future__ import annotations

from sqlalchemy import select

from shared.buckets import bucket_key
from shared.db import session_scope
from shared.models import Job
from shared.params import JobParams
from tests.support.apps import Api, upload
from tests.support.images import image_bytes


def test_a_batch_records_each_jobs_bucket(api: Api) -> None:
    wide = upload(api.client, image_bytes(96, 64)).json()["id"]
    tall = upload(api.client, image_bytes(64, 96)).json()["id"]
    style = upload(api.client, image_bytes()).json()["id"]
    params = {"size": 64, "min_size": 32, "iterations": 5}
    body = {"contents": [wide, tall], "styles": [style], "params": params}
    r = api.client.post("/v1/batches", json=body)
    assert r.status_code == 202, r.text
    with session_scope(api.settings.database_url) as s:
        rows = dict(s.execute(select(Job.content_image_id, Job.bucket)).all())
    parsed = JobParams(**params)
    assert rows == {wide: bucket_key(parsed, (96, 64)), tall: bucket_key(parsed, (64, 96))}
    assert rows[wide] != rows[tall]
