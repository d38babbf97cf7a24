"""The names and media types of stored objects: the one place that spells them.

Every object key of the project is built here (the API stores uploads, the worker results and
checkpoints, the API serves them back). The strings are part of the stored data: objects written by
earlier versions are found under these same keys, so change none of them without a migration.

* ``images/<sha256>`` — an uploaded image, content-addressed (stored once for every tenant);
* ``jobs/<job_id>/result.a<attempt>.<ext>`` — a job's result, one object per attempt, so an attempt
  that lost the job never overwrites the one a newer attempt recorded;
* ``jobs/<job_id>/checkpoints/<step>.pt`` and ``<step>.png`` — a checkpoint and its preview;
* ``jobs/<job_id>/checkpoints/<step>.thumb.jpg`` and ``jobs/<job_id>/result.a<attempt>.thumb.jpg`` — the
  small JPEG thumbnails (``THUMB_*``) of a preview and of a result, which the page's grids show.
  Jobs of earlier versions have none: a checkpoint ref without ``thumb_key``, a job whose
  ``execution`` has no ``result_thumb_key``.

Media types: ``FORMAT_MEDIA_TYPES`` by Pillow format (uploads), ``MEDIA_TYPES`` by file extension
(downloads), ``result_extension``/``result_media_type`` by ``JobParams.output_format``.
"""

from __future__ import annotations


def image_key(image_id: str) -> str:
    """An uploaded image (``image_id`` is its sha256 hex)."""
    return f"images/{image_id}"


def result_key(job_id: str, attempt: int, output_format: str) -> str:
    """The result of ``attempt`` of a job, in ``JobParams.output_format`` (``jpeg`` is stored as
    ``.jpg``, see ``result_extension``)."""
    return f"jobs/{job_id}/result.a{attempt}.{result_extension(output_format)}"


def checkpoint_key(job_id: str, step: int) -> str:
    """A checkpoint (the engine's ``Checkpoint.to_bytes``) after optimisation step ``step``."""
    return f"jobs/{job_id}/checkpoints/{step}.pt"


def preview_key(job_id: str, step: int) -> str:
    """The PNG preview of the checkpoint at ``step``."""
    return f"jobs/{job_id}/checkpoints/{step}.png"


def thumb_key(job_id: str, step: int) -> str:
    """The JPEG thumbnail (``THUMB_*``) of the checkpoint preview at ``step``."""
    return f"jobs/{job_id}/checkpoints/{step}{THUMB_SUFFIX}"


def result_thumb_key(job_id: str, attempt: int) -> str:
    """The JPEG thumbnail (``THUMB_*``) of the result of ``attempt``, whatever its format."""
    return f"jobs/{job_id}/result.a{attempt}{THUMB_SUFFIX}"


def result_thumb_of(result: str) -> str | None:
    """The thumbnail key of a result's key (``result_key``'s shape); None for any other key."""
    job_id, name = job_of(result), result.rsplit("/", 1)[-1]
    attempt, dot, _ = name.removeprefix("result.a").partition(".")
    if job_id is None or result != f"jobs/{job_id}/{name}" or not name.startswith("result.a"):
        return None
    return result_thumb_key(job_id, int(attempt)) if attempt.isdigit() and dot else None


#: The fields of a checkpoint ref (``jobs.checkpoints``) that name its objects (a ref written before
#: thumbnails has no ``thumb_key``).
CHECKPOINT_REF_KEYS = ("key", "preview_key", "thumb_key")
#: The field of ``jobs.execution`` naming the result's thumbnail (absent for earlier jobs).
RESULT_THUMB_FIELD = "result_thumb_key"

# Thumbnails: the long edge at most THUMB_MAX_EDGE px (never enlarged), RGB JPEG at THUMB_QUALITY.
THUMB_MAX_EDGE = 256
THUMB_FORMAT = "JPEG"
THUMB_QUALITY = 85
THUMB_SUFFIX = ".thumb.jpg"


#: Where every object of the service lives: what the orphan sweep (``shared.retention``) lists.
PREFIXES = ("images/", "jobs/")


def job_of(key: str) -> str | None:
    """The job id of a ``jobs/<job_id>/...`` key; None for any other key."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "jobs" and parts[1] else None


# Pillow format of an accepted upload (shared.imagecheck.ALLOWED_FORMATS) -> the media type it is
# stored with.
FORMAT_MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
}

# JobParams.output_format -> the result's file extension.
RESULT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

# File extension of a stored result or checkpoint -> the media type it is served (and stored) with.
MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "pt": "application/octet-stream",
}
DEFAULT_MEDIA_TYPE = "application/octet-stream"
CHECKPOINT_MEDIA_TYPE = MEDIA_TYPES["pt"]
PREVIEW_MEDIA_TYPE = MEDIA_TYPES["png"]
THUMB_MEDIA_TYPE = MEDIA_TYPES["jpg"]
RESULT_MEDIA_TYPES = tuple(dict.fromkeys(MEDIA_TYPES[e] for e in RESULT_EXTENSIONS.values()))


def result_extension(output_format: str) -> str:
    """The file extension of a result in ``output_format`` (``jpeg`` -> ``jpg``; an unknown format
    is its own extension)."""
    return RESULT_EXTENSIONS.get(output_format, output_format)


def result_media_type(output_format: str) -> str:
    """The media type a result in ``output_format`` is stored with."""
    return media_type(result_extension(output_format))


def media_type(key: str) -> str:
    """The media type of a stored object, from its key's (or a bare) extension."""
    return MEDIA_TYPES.get(key.rsplit(".", 1)[-1].lower(), DEFAULT_MEDIA_TYPE)


__all__ = [
    "CHECKPOINT_MEDIA_TYPE",
    "CHECKPOINT_REF_KEYS",
    "DEFAULT_MEDIA_TYPE",
    "FORMAT_MEDIA_TYPES",
    "MEDIA_TYPES",
    "PREFIXES",
    "PREVIEW_MEDIA_TYPE",
    "RESULT_EXTENSIONS",
    "RESULT_MEDIA_TYPES",
    "RESULT_THUMB_FIELD",
    "THUMB_FORMAT",
    "THUMB_MAX_EDGE",
    "THUMB_MEDIA_TYPE",
    "THUMB_QUALITY",
    "THUMB_SUFFIX",
    "checkpoint_key",
    "image_key",
    "job_of",
    "media_type",
    "preview_key",
    "result_extension",
    "result_key",
    "result_media_type",
    "result_thumb_key",
    "result_thumb_of",
    "thumb_key",
]
