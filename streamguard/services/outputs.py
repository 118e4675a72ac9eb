"""Where a job's media goes (CONTRACT §8): its own `s3Config`, else its
project's default (PUT /v1/project/storage), else this node's media storage.

An S3Config is stored as JSON with `secretKey` sealed (secretbox: encrypted
at rest with the node's key) and shown as "***"; it is opened only to upload.

Keys: a request's `prefix` is the job's folder as given (the reference's
`videos/my-video/`); a job without one, or using the project default, gets
its own folder `<prefix><job id>/`, so jobs never overwrite each other.
"""

from __future__ import annotations

import msgspec

from ..addresses import AddressPolicy, check_host
from ..media.storage import S3Target, join_key
from ..schemas import S3Config, S3ConfigView
from ..secretbox import SecretBox


def seal(box: SecretBox, config: S3Config) -> str:
    data = msgspec.to_builtins(config)
    data["secretKey"] = box.seal(config.secretKey)
    return msgspec.json.encode(data).decode()


def unseal(box: SecretBox, stored: str) -> S3Config:
    data = msgspec.json.decode(stored)
    data["secretKey"] = box.open(data["secretKey"])
    return msgspec.convert(data, S3Config)


def reseal(box: SecretBox, rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Stored configs (table, id, JSON) with their secret re-encrypted under
    the box's current key (`streamguard keys rotate-secret-key`)."""
    out = []
    for table, row_id, stored in rows:
        data = msgspec.json.decode(stored)
        data["secretKey"] = box.rotate(data["secretKey"])
        out.append((table, row_id, msgspec.json.encode(data).decode()))
    return out


def view(stored: str | None) -> S3ConfigView | None:
    """The stored config as shown: everything but the secret (never opened here)."""
    if stored is None:
        return None
    data = msgspec.json.decode(stored)
    data.pop("secretKey", None)
    return msgspec.convert(data, S3ConfigView)


def job_config(request: S3Config | None, project_default: S3Config | None, job_id: str) -> S3Config | None:
    """The S3Config a job runs with, its prefix resolved to the job's own folder."""
    if request is not None:
        prefix = request.prefix if request.prefix and request.prefix.strip("/") else job_id
        return msgspec.structs.replace(request, prefix=join_key(prefix) + "/")
    if project_default is not None:
        return msgspec.structs.replace(project_default,
                                       prefix=join_key(project_default.prefix or "", job_id) + "/")
    return None


def target(config: S3Config) -> S3Target:
    return S3Target(bucket=config.bucket, access_key=config.accessKey, secret_key=config.secretKey,
                    region=config.region or "", endpoint=config.endpoint or "", prefix=config.prefix or "",
                    public_url=config.cdnUrl or "")


async def check_endpoint(config: S3Config, field: str, policy: AddressPolicy) -> None:
    """An endpoint obeys the same address rules as inputs: a user's store
    must not be a way into the node's private network."""
    if config.endpoint:
        await check_host(config.endpoint, f"{field}.endpoint", policy)
