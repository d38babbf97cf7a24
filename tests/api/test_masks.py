"""Spatial control: a content mask per style on POST /v1/jobs and /v1/batches (SQLite and PostgreSQL).

Masks are stored like every image; their count and aspect ratio are checked before anything is
stored, and a rejected request changes nothing (rows and objects counted before and after).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import create_engine, select, text

from api.masks import MASK_ASPECT_TOLERANCE, aspect_matches
from shared.db import session_scope
from shared.migrate import upgrade
from shared.models import Job
from tests.support.apps import Api, upload
from tests.support.images import image_bytes

_shades = itertools.count(1)
KEY = {"Idempotency-Key": "masks-1"}


def mask_png(w: int = 64, h: int = 48) -> bytes:
    """A distinct greyscale mask: left half white, right half a grey that differs per call."""
    img = Image.new("L", (w, h), next(_shades) % 250 + 1)
    img.paste(255, (0, 0, w // 2, h))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def post_job(
    client: Any,
    content: bytes | str,
    styles: Sequence[bytes | str],
    masks: Sequence[bytes | str],
    headers: dict[str, str] | None = None,
) -> Any:
    """Files for bytes, ``*_id`` fields for ids (files first, then ids, as the API orders them)."""
    files: list[tuple[str, Any]] = []
    for name, values in (("content", [content]), ("style", styles), ("mask", masks)):
        for i, v in enumerate(values):
            field = (
                (name, (f"{name}{i}.png", v, "image/png"))
                if isinstance(v, bytes)
                else (f"{name}_id", (None, v.encode()))
            )
            files.append(field)
    files.append(("params", (None, b'{"size": 64, "min_size": 32}')))
    return client.post("/v1/jobs", files=files, headers=headers or {})


def error(r: Any, status: int = 422) -> tuple[str, str]:
    assert r.status_code == status, r.text
    return r.json()["error"]["code"], r.json()["error"]["message"]


# --- POST /v1/jobs --------------------------------------------------------------------------------


def test_job_with_masks_is_stored_and_shown(any_api: Api) -> None:
    content, styles = image_bytes(64, 48), [image_bytes(), image_bytes()]
    m0, m1 = mask_png(128, 96), mask_png(65, 48)  # same aspect; 1.6 % wider: within tolerance
    m1_id = upload(any_api.client, m1).json()["id"]
    before = any_api.counts()
    r = post_job(any_api.client, content, styles, [m0, m1_id])
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["mask_ids"] == [sha(m0), m1_id]
    assert job["style_ids"] == [sha(s) for s in styles]
    after = any_api.counts()  # content, 2 styles, 1 new mask (the other was uploaded first)
    assert (after["images"] - before["images"], after["objects"] - before["objects"]) == (4, 4)
    assert any_api.storage.get_bytes(f"images/{sha(m0)}") == m0
    assert any_api.client.get(f"/v1/jobs/{job['id']}").json()["mask_ids"] == [sha(m0), m1_id]
    with session_scope(any_api.settings.database_url) as session:
        assert session.get(Job, job["id"]).mask_image_ids == [sha(m0), m1_id]  # type: ignore[union-attr]


def test_job_without_masks_has_null_mask_ids(any_api: Api) -> None:
    r = post_job(any_api.client, image_bytes(), [image_bytes()], [])
    assert r.status_code == 202, r.text
    assert r.json()["mask_ids"] is None
    listed = any_api.client.get("/v1/jobs").json()["items"]
    assert [j["mask_ids"] for j in listed] == [None]
    with session_scope(any_api.settings.database_url) as session:  # SQL NULL, not JSON null
        assert session.execute(text("SELECT count(*) FROM jobs WHERE mask_image_ids IS NULL")).scalar() == 1


def test_one_style_with_a_mask_is_allowed(api: Api) -> None:
    r = post_job(api.client, image_bytes(), [image_bytes()], [mask_png()])
    assert r.status_code == 202, r.text
    assert len(r.json()["mask_ids"]) == 1


def test_a_mask_for_each_of_the_most_styles(api: Api) -> None:
    """max_styles styles and as many masks: more files than a job form used to take."""
    n = api.settings.max_styles
    r = post_job(api.client, image_bytes(), [image_bytes() for _ in range(n)], [mask_png() for _ in range(n)])
    assert r.status_code == 202, r.text
    assert len(r.json()["mask_ids"]) == n == 8


def _refused(api: Api, r: Any, code: str) -> str:
    got, message = error(r)
    assert got == code, message
    return message


def test_mask_count_must_match_the_styles(any_api: Api) -> None:
    before = any_api.counts()
    message = _refused(
        any_api,
        post_job(any_api.client, image_bytes(), [image_bytes(), image_bytes()], [mask_png()]),
        "mask_count_mismatch",
    )
    assert "2 style(s) and 1 mask(s)" in message
    _refused(
        any_api,
        post_job(any_api.client, image_bytes(), [image_bytes()], [mask_png(), mask_png()]),
        "mask_count_mismatch",
    )
    assert any_api.counts() == before and any_api.publisher.published == []


def test_mask_aspect_must_match_the_content(any_api: Api) -> None:
    before = any_api.counts()
    r = post_job(
        any_api.client,
        image_bytes(64, 48),
        [image_bytes(), image_bytes()],
        [mask_png(64, 48), mask_png(48, 64)],
    )
    message = _refused(any_api, r, "mask_shape_mismatch")
    assert "mask[1]" in message and "48x64" in message and "64x48" in message
    _refused(
        any_api,
        post_job(any_api.client, image_bytes(64, 48), [image_bytes()], [mask_png(66, 48)]),
        "mask_shape_mismatch",
    )  # 3.1 % off
    assert any_api.counts() == before and any_api.publisher.published == []


def test_mask_aspect_from_a_stored_image(api: Api) -> None:
    content_id = upload(api.client, image_bytes(64, 48)).json()["id"]
    tall = upload(api.client, mask_png(48, 64)).json()["id"]
    before = api.counts()
    message = _refused(api, post_job(api.client, content_id, [image_bytes()], [tall]), "mask_shape_mismatch")
    assert "mask[0] is 48x64" in message
    assert api.counts() == before


def test_unknown_or_foreign_mask_id_is_unknown_image(any_api: Api) -> None:
    theirs = upload(any_api.as_tenant("bob"), mask_png()).json()["id"]
    before = any_api.counts()
    for mask_id in ("f" * 64, theirs, "not-an-id"):
        _refused(
            any_api, post_job(any_api.client, image_bytes(), [image_bytes()], [mask_id]), "unknown_image"
        )
    assert any_api.counts() == before


def test_a_mask_that_is_not_an_image_is_refused(api: Api) -> None:
    before = api.counts()
    code, message = error(post_job(api.client, image_bytes(), [image_bytes()], [b"nope" * 10]))
    assert code == "not_an_image" and message.startswith("mask[0]")
    assert api.counts() == before


# --- POST /v1/batches -----------------------------------------------------------------------------


def _ids(api: Api, *images: bytes) -> list[str]:
    return [upload(api.client, i).json()["id"] for i in images]


def test_json_batch_with_masks_in_pairs(any_api: Api) -> None:
    c = _ids(any_api, image_bytes(64, 48), image_bytes(48, 64))
    s = _ids(any_api, image_bytes(), image_bytes())
    m = _ids(any_api, mask_png(64, 48), mask_png(48, 64), mask_png(128, 96))
    r = any_api.client.post(
        "/v1/batches",
        json={
            "contents": c,
            "styles": s,
            "masks": m,
            "mode": "pairs",
            "pairs": [[0, [0, 1], [2, 0]], [1, 0, [1]], [0, 1]],
            "params": {"size": 64, "min_size": 32},
        },
    )
    assert r.status_code == 202, r.text
    jobs = [any_api.client.get(f"/v1/jobs/{j}").json() for j in r.json()["job_ids"]]
    assert [(j["content_id"], j["style_ids"], j["mask_ids"]) for j in jobs] == [
        (c[0], [s[0], s[1]], [m[2], m[0]]),
        (c[1], [s[0]], [m[1]]),
        (c[0], [s[1]], None),
    ]


def test_multipart_batch_with_masks(any_api: Api) -> None:
    mask_files, stored = [mask_png(), mask_png()], _ids(any_api, mask_png())
    files = [
        ("content", ("c.png", image_bytes(64, 48))),
        ("style", ("s0.png", image_bytes())),
        ("style", ("s1.png", image_bytes())),
    ]
    files += [("mask", (f"m{i}.png", m)) for i, m in enumerate(mask_files)]
    before = any_api.counts()
    r = any_api.client.post(
        "/v1/batches",
        files=files,
        data={"mask_id": stored, "mode": "pairs", "pairs": json.dumps([[0, [0, 1], [2, 1]], [0, 0, [0]]])},
    )
    assert r.status_code == 202, r.text
    jobs = [any_api.client.get(f"/v1/jobs/{j}").json() for j in r.json()["job_ids"]]
    masks = [sha(m) for m in mask_files] + stored  # uploaded files first, then mask_id values
    assert [j["mask_ids"] for j in jobs] == [[masks[2], masks[1]], [masks[0]]]
    assert any_api.counts()["images"] - before["images"] == 5  # content, 2 styles, 2 masks


def _batch(
    api: Api, masks: list[str], pairs: Any, mode: str = "pairs", contents: list[str] | None = None
) -> Any:
    """A JSON batch; its images are uploaded first, so ``counts()`` is taken after this returns
    a sender (``send()``)."""
    body: dict[str, Any] = {
        "contents": contents or _ids(api, image_bytes(64, 48)),
        "styles": _ids(api, image_bytes(), image_bytes()),
        "masks": masks,
        "mode": mode,
    }
    if pairs is not None:
        body["pairs"] = pairs
    return lambda: api.client.post("/v1/batches", json=body)


@pytest.mark.parametrize("mode, pairs", [("product", None), ("pairs", [[0, 0], [0, 1]])])
def test_batch_masks_need_pairs(api: Api, mode: str, pairs: Any) -> None:
    m = _ids(api, mask_png())
    send = _batch(api, m, pairs, mode)
    before = api.counts()
    _refused(api, send(), "masks_need_pairs")
    assert api.counts() == before


@pytest.mark.parametrize(
    "pairs, code, words",
    [
        ([[0, 0, [1]]], "invalid_pairs", "out of range"),
        ([[0, 0, [-1]]], "invalid_pairs", "out of range"),
        ([[0, [0, 1], [0]]], "mask_count_mismatch", "2 style(s) and 1 mask(s)"),
        ([[0, 0, []]], "mask_count_mismatch", "empty mask list"),
        ([[0, 0, 0]], "invalid_pairs", "[content, style(s), [mask per style]]"),
        ([[0, 0, [True]]], "invalid_pairs", "pairs must be"),
        ([[0, 0, [0], [0]]], "invalid_pairs", "pairs must be"),
    ],
)
def test_bad_mask_indexes_are_refused(api: Api, pairs: Any, code: str, words: str) -> None:
    m = _ids(api, mask_png())
    send = _batch(api, m, pairs)
    before = api.counts()
    assert words in _refused(api, send(), code)
    assert api.counts() == before


def test_batch_mask_aspect_mismatch_names_the_mask(any_api: Api) -> None:
    c = _ids(any_api, image_bytes(64, 48), image_bytes(48, 64))
    m = _ids(any_api, mask_png(64, 48))
    send = _batch(any_api, m, [[0, 0, [0]], [1, 1, [0]]], contents=c)
    before = any_api.counts()
    message = _refused(any_api, send(), "mask_shape_mismatch")
    assert "masks[0] (pair 1, style 0) is 64x48" in message and "48x64" in message
    assert any_api.counts() == before


@pytest.mark.parametrize("case", ["aspect", "index", "count", "unknown", "no_pairs"])
def test_rejected_multipart_batch_stores_no_image(any_api: Api, case: str) -> None:
    """Every upload of the request is valid on its own: nothing of it may be stored."""
    pairs = {
        "aspect": [[0, 0, [1]]],
        "index": [[0, 0, [2]]],
        "count": [[0, [0, 1], [0]]],
        "unknown": [[0, 0, [2]]],
        "no_pairs": None,
    }[case]
    files = [
        ("content", ("c.png", image_bytes(64, 48))),
        ("style", ("s0.png", image_bytes())),
        ("style", ("s1.png", image_bytes())),
        ("mask", ("m0.png", mask_png(64, 48))),
        ("mask", ("m1.png", mask_png(48, 64))),
    ]
    data: dict[str, Any] = {"mode": "pairs" if pairs else "product"}
    if pairs:
        data["pairs"] = json.dumps(pairs)
    if case == "unknown":
        data["mask_id"] = "e" * 64
    before = any_api.counts()
    code, _ = error(any_api.client.post("/v1/batches", files=files, data=data))
    assert (
        code
        == {
            "aspect": "mask_shape_mismatch",
            "index": "invalid_pairs",
            "count": "mask_count_mismatch",
            "unknown": "unknown_image",
            "no_pairs": "masks_need_pairs",
        }[case]
    )
    assert any_api.counts() == before and any_api.publisher.published == []


def test_batch_with_too_many_masks(settings_factory: Any) -> None:
    from tests.support.apps import build_api

    api = build_api(settings_factory(max_batch_jobs=2))
    c, s = _ids(api, image_bytes()), _ids(api, image_bytes())
    r = api.client.post(
        "/v1/batches",
        json={"contents": c, "styles": s, "masks": ["a" * 64] * 3, "mode": "pairs", "pairs": [[0, 0, [0]]]},
    )
    assert error(r)[0] == "batch_too_large"


# --- idempotency ----------------------------------------------------------------------------------


def test_idempotent_job_replay_and_other_masks(any_api: Api) -> None:
    content, style, mask = image_bytes(), image_bytes(), mask_png()
    first = post_job(any_api.client, content, [style], [mask], KEY)
    assert first.status_code == 202, first.text
    again = post_job(any_api.client, content, [style], [mask], KEY)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    before = any_api.counts()
    for masks in ([mask_png()], []):  # another mask; no mask at all
        r = post_job(any_api.client, content, [style], masks, KEY)
        assert error(r)[0] == "idempotency_key_reused"
    assert any_api.counts() == before


def test_idempotent_batch_with_other_masks_is_refused(api: Api) -> None:
    c, s = _ids(api, image_bytes()), _ids(api, image_bytes())
    m = _ids(api, mask_png(), mask_png())
    body = {"contents": c, "styles": s, "masks": m, "mode": "pairs", "pairs": [[0, 0, [0]]]}
    first = api.client.post("/v1/batches", json=body, headers=KEY)
    assert first.status_code == 202, first.text
    assert api.client.post("/v1/batches", json=body, headers=KEY).json() == first.json()
    before = api.counts()
    for other in ({**body, "pairs": [[0, 0, [1]]]}, {**body, "masks": [m[1], m[0]]}):
        assert error(api.client.post("/v1/batches", json=other, headers=KEY))[0] == "idempotency_key_reused"
    assert api.counts() == before


# --- the rule, the schema, the migration ----------------------------------------------------------


def test_aspect_rule() -> None:
    assert MASK_ASPECT_TOLERANCE == 0.02
    assert aspect_matches((64, 48), (640, 480)) and aspect_matches((65, 48), (64, 48))
    assert not aspect_matches((66, 48), (64, 48)) and not aspect_matches((48, 64), (64, 48))
    assert aspect_matches((1000, 1000), (1019, 1000)) and not aspect_matches((1000, 1000), (1021, 1000))


def test_openapi_documents_masks(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    job_form = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"mask", "mask_id"} <= set(job_form["schema"]["properties"])
    batch = spec["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    assert {"mask", "mask_id"} <= set(batch["multipart/form-data"]["schema"]["properties"])
    props = batch["application/json"]["schema"]["properties"]
    assert "masks" in props
    assert max(len(v.get("prefixItems", [])) for v in props["pairs"]["anyOf"][0]["items"]["anyOf"]) == 3
    job_out = spec["components"]["schemas"]["JobOut"]["properties"]
    assert "mask_ids" in job_out


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migration_adds_a_null_column_to_existing_jobs(which: str, tmp_path: Path) -> None:
    if which == "sqlite":
        _migrate_from_0001(f"sqlite:///{tmp_path / 'old.db'}")
        return
    from tests.support.servers import port_open, require, temporary_database

    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    with temporary_database("sq_masks") as url:
        _migrate_from_0001(url)


def _migrate_from_0001(url: str) -> None:
    upgrade(url, "0001")
    engine = create_engine(url)
    now = "2026-01-01 00:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :n)"), {"n": now})
        conn.execute(text("INSERT INTO images VALUES ('i', 'PNG', 64, 48, 1, 'images/i', :n)"), {"n": now})
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, params, content_image_id, style_image_ids, "
                "progress, attempt, max_attempts, cancel_requested, checkpoints, created_at, "
                "updated_at) VALUES ('j', 't', 'queued', '{}', 'i', '[\"i\"]', '{}', 0, 3, false, "
                "'[]', :n, :n)"
            ),
            {"n": now},
        )
    upgrade(url, "0002")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        assert conn.execute(select(Job.mask_image_ids).where(Job.id == "j")).scalar() is None
    engine.dispose()


def test_w2_work_counts_each_masked_region(any_api: Api) -> None:
    """style_loss w2 costs one eigendecomposition per layer and style region: three masked styles
    cost three times the W2 share of an unmasked three-style job (JobParams.work(regions))."""
    content, styles = image_bytes(64, 48), [image_bytes(), image_bytes(), image_bytes()]
    params = json.dumps({"size": 512, "min_size": 512, "iterations": 5000, "style_loss": "w2"})

    def post(masks: list[bytes]) -> Any:
        files: list[tuple[str, Any]] = [("content", ("c.png", content, "image/png"))]
        files += [("style", (f"s{i}.png", s, "image/png")) for i, s in enumerate(styles)]
        files += [("mask", (f"m{i}.png", m, "image/png")) for i, m in enumerate(masks)]
        files.append(("params", (None, params.encode())))
        return any_api.client.post("/v1/jobs", files=files)

    assert post([]).status_code == 202  # 5000 x (512^2 + 256^2) = 1.6e9 <= 2e9
    before = any_api.counts()
    code, message = error(post([mask_png(), mask_png(), mask_png()]))  # 5000 x (512^2 + 3 x 256^2)
    assert code == "too_much_work" and "2.29e+09" in message, message
    assert any_api.counts() == before
