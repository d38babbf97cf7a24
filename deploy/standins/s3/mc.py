#!/usr/local/pyvenv/bin/python
"""Just enough of MinIO's `mc` for deploy/compose.yaml, against moto's S3 server.

alias set NAME URL KEY SECRET, ready NAME, mb [--ignore-existing] NAME/BUCKET, anonymous set none
NAME/BUCKET (moto's buckets are private already), and `admin ...` (moto has no users or policies: it
accepts any credentials, so these succeed and say that nothing was done).
"""

import json
import os
import sys
import urllib.request

import boto3

CONFIG = os.path.expanduser("~/.mc-standin.json")
DEFAULT = {"local": {"url": "http://127.0.0.1:9000", "key": "standin", "secret": "standin"}}


def aliases() -> dict:
    try:
        with open(CONFIG) as f:
            return {**DEFAULT, **json.load(f)}
    except OSError:
        return dict(DEFAULT)


def client(alias: dict):
    return boto3.client(
        "s3",
        endpoint_url=alias["url"],
        aws_access_key_id=alias["key"],
        aws_secret_access_key=alias["secret"],
        region_name="us-east-1",
    )


def main(argv: list) -> int:
    if argv[:2] == ["alias", "set"] and len(argv) == 6:
        found = aliases()
        found[argv[2]] = {"url": argv[3], "key": argv[4], "secret": argv[5]}
        with open(CONFIG, "w") as f:
            json.dump(found, f)
        return 0
    if argv[:1] == ["ready"] and len(argv) == 2:
        try:
            urllib.request.urlopen(aliases()[argv[1]]["url"], timeout=2)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return 1
        return 0
    if argv[:1] == ["mb"]:
        target = next(a for a in argv[1:] if not a.startswith("-"))
        name, bucket = target.split("/", 1)
        s3 = client(aliases()[name])
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            if "--ignore-existing" not in argv:
                raise
        print(f"Bucket `{target}` ready.")
        return 0
    if argv[:2] == ["anonymous", "set"] or argv[:1] == ["admin"]:
        print(f"mc (moto stand-in): `{' '.join(argv[:3])}` needs nothing here; moto has no users or policies")
        return 0
    print(f"mc (moto stand-in): unsupported command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
