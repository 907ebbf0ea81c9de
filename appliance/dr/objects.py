"""The DR bucket: every object encrypted client-side, locked, written to the primary and the replica,
and read back with its checksum checked. See appliance/dr/DESIGN.md ("Objects in the bucket").
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions

from appliance.backends import Backends, S3Target
from appliance.dr.crypto import DataKey, DecryptError, decrypt_stream, encrypt_stream
from appliance.errors import CheckFailed, ServiceError
from appliance.site import Dr

_SHA_META = "plaintext-sha256"
_SIZE_META = "plaintext-bytes"
_CIPHER_META = "ciphertext-sha256"


class MissingObject(CheckFailed):
    """An object a backup or shipment needs is not in the bucket."""


class CorruptObject(CheckFailed):
    """An object is there but does not decrypt or does not match its checksum."""


class S3Unavailable(ServiceError):
    """The endpoint did not answer (down, refused, timed out): retry later, nothing was recorded."""


class S3Denied(ServiceError):
    """The endpoint answered but refused the credentials or the request."""


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the bucket root
    size: int  # plaintext bytes
    sha256: str  # of the plaintext
    version_id: str | None = None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def s3_errors(target: S3Target, what: str) -> Iterator[None]:
    """Turn botocore's errors into the two kinds callers act on: retry later, or a clear refusal."""
    try:
        yield
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
        raise S3Unavailable(f"S3 endpoint {target.endpoint} is unreachable while {what}: {exc}") from exc
    except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError) as exc:
        raise S3Unavailable(f"S3 endpoint {target.endpoint} dropped the connection while {what}: {exc}") from exc
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"}:
            raise S3Denied(
                f"S3 at {target.endpoint} refused the credentials while {what} ({code})",
                hint="check the access key and secret key stored in Vault for this target",
            ) from exc
        if status >= 500 or code in {"SlowDown", "ServiceUnavailable", "InternalError"}:
            raise S3Unavailable(f"S3 at {target.endpoint} failed while {what}: {code} (HTTP {status})") from exc
        raise S3Denied(f"S3 at {target.endpoint} refused {what}: {code}: {error.get('Message', '')}") from exc


class DrBucket:
    """The site's DR objects under `<prefix>/<site>/` on the primary target, mirrored to the replica."""

    def __init__(
        self,
        primary: S3Target,
        replica: S3Target | None,
        key: DataKey,
        policy: Dr,
        *,
        site_name: str,
        sse: bool | None = None,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.key = key
        self.policy = policy
        self.root = f"{policy.prefix}/{site_name}/"
        self._sse = sse

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, backends: Backends) -> DrBucket:
        """The site's bucket with the data key from Vault (raises CheckFailed if `dr init` never ran)."""
        site = backends.site
        try:
            secret = backends.read_secret(site.dr.encryption_key_vault_path)
        except ServiceError as exc:
            raise CheckFailed(
                f"no DR data key in Vault at {site.dr.encryption_key_vault_path}",
                hint="run `appliance dr init` once: it creates the key and configures the buckets",
            ) from exc
        try:
            key = DataKey(base64.b64decode(secret["key_b64"], validate=True))
        except (KeyError, ValueError) as exc:
            raise CheckFailed(f"the DR data key in Vault at {site.dr.encryption_key_vault_path} is malformed") from exc
        replica = backends.s3("replica") if site.services.s3.replica is not None else None
        return cls(backends.s3("primary"), replica, key, site.dr, site_name=site.site.name)

    def targets(self) -> list[tuple[str, S3Target]]:
        out = [("primary", self.primary)]
        if self.replica is not None:
            out.append(("replica", self.replica))
        return out

    def full_key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a relative object key: {key!r}")
        return self.root + key

    def s3_url(self, key: str, target: S3Target | None = None) -> str:
        """The object's http(s) URL, for engines that write to S3 themselves (ClickHouse BACKUP)."""
        target = target or self.primary
        return f"{target.endpoint.rstrip('/')}/{target.bucket}/{self.full_key(key)}"

    def sse_supported(self) -> bool:
        """Whether to ask for SSE: per the site (`dr.sse`), or on `auto` whether the endpoint has it set up."""
        if self._sse is not None:
            return self._sse
        mode = self.policy.sse
        if mode == "off":
            self._sse = False
        elif mode == "AES256":
            self._sse = True
        else:
            try:
                self.primary.client.get_bucket_encryption(Bucket=self.primary.bucket)
                self._sse = True
            except botocore.exceptions.ClientError:
                self._sse = False
            except botocore.exceptions.BotoCoreError as exc:
                raise S3Unavailable(f"S3 endpoint {self.primary.endpoint} is unreachable: {exc}") from exc
        return self._sse

    # -- writing ---------------------------------------------------------------------------------------

    def lock_args(self) -> dict[str, Any]:
        until = datetime.now(UTC) + timedelta(days=self.policy.object_lock.days)
        return {
            "ObjectLockMode": self.policy.object_lock.mode.upper(),
            "ObjectLockRetainUntilDate": until,
        }

    def put_file(self, key: str, path: Path, *, meta: dict[str, str] | None = None) -> StoredObject:
        """Encrypt `path` and write it to every target; the replica copy is read back and compared."""
        full = self.full_key(key)
        plain_sha = _sha256_file(path)
        size = path.stat().st_size
        with tempfile.TemporaryDirectory(prefix="membria-dr-") as tmp:
            sealed = Path(tmp) / "object.bin"
            with path.open("rb") as src, sealed.open("wb") as dst:
                encrypt_stream(self.key, full, src, dst)
            cipher_sha = _sha256_file(sealed)
            metadata = {_SHA_META: plain_sha, _SIZE_META: str(size), _CIPHER_META: cipher_sha, **(meta or {})}
            version = None
            for name, target in self.targets():
                extra: dict[str, Any] = {"Metadata": metadata, **self.lock_args()}
                if self.sse_supported():
                    extra["ServerSideEncryption"] = "AES256"
                with s3_errors(target, f"writing {full} to the {name} bucket"), sealed.open("rb") as body:
                    response = target.client.put_object(
                        Bucket=target.bucket,
                        Key=full,
                        Body=body,
                        ChecksumAlgorithm="SHA256",
                        **extra,
                    )
                if name == "primary":
                    version = response.get("VersionId")
                else:
                    self.verify_copy(target, full, cipher_sha)
        return StoredObject(key, size, plain_sha, version)

    def put_raw(
        self, key: str, path: Path, *, sha256: str, meta: dict[str, str] | None = None, only: str | None = None
    ) -> str | None:
        """Write `path` as is, without the client-side layer (for what must stay readable without the data
        key, or what an engine wrote itself), with SSE where offered and object lock, to every target (or
        `only` one); a replica's copy is read back and compared. Returns the primary's version id."""
        full = self.full_key(key)
        version = None
        for name, target in self.targets():
            if only is not None and name != only:
                continue
            extra: dict[str, Any] = {"Metadata": {_SHA_META: sha256, **(meta or {})}, **self.lock_args()}
            if self.sse_supported():
                extra["ServerSideEncryption"] = "AES256"
            with s3_errors(target, f"writing {full} to the {name} bucket"), path.open("rb") as body:
                response = target.client.put_object(
                    Bucket=target.bucket, Key=full, Body=body, ChecksumAlgorithm="SHA256", **extra
                )
            if name == "primary":
                version = response.get("VersionId")
            else:
                self.verify_copy(target, full, sha256)
        return version

    def get_raw(self, key: str, dest: Path, *, sha256: str) -> Path:
        """Download `key` (written by put_raw) from the primary into `dest`, checking its sha256."""
        full = self.full_key(key)
        digest = hashlib.sha256()
        try:
            with s3_errors(self.primary, f"reading {full}"):
                body = self.primary.client.get_object(Bucket=self.primary.bucket, Key=full)["Body"]
                with dest.open("wb") as out:
                    for block in iter(lambda: body.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        except S3Denied as exc:
            if _is_missing(exc):
                raise MissingObject(f"{full} is missing from the primary bucket {self.primary.bucket}") from None
            raise
        if digest.hexdigest() != sha256:
            dest.unlink(missing_ok=True)
            raise CorruptObject(f"{full}: checksum {digest.hexdigest()[:16]}… is not the recorded {sha256[:16]}…")
        return dest

    def put_bytes(self, key: str, data: bytes, *, meta: dict[str, str] | None = None) -> StoredObject:
        with tempfile.TemporaryDirectory(prefix="membria-dr-") as tmp:
            path = Path(tmp) / "plain"
            path.write_bytes(data)
            return self.put_file(key, path, meta=meta)

    def put_json(self, key: str, value: Any) -> StoredObject:
        return self.put_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def verify_copy(self, target: S3Target, full: str, cipher_sha: str) -> None:
        """Read the replica's object back: the copy is checked, not assumed."""
        digest = hashlib.sha256()
        with s3_errors(target, f"reading back {full} from the replica"):
            body = target.client.get_object(Bucket=target.bucket, Key=full)["Body"]
            for block in iter(lambda: body.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != cipher_sha:
            raise CorruptObject(f"the replica copy of {full} at {target.endpoint} differs from what was written")

    # -- reading ---------------------------------------------------------------------------------------

    def get_file(self, key: str, dest: Path, *, target: str = "primary", expect_sha256: str | None = None) -> Path:
        """Download, decrypt and check `key` into `dest` (written atomically). Raises MissingObject or
        CorruptObject naming the key."""
        chosen = dict(self.targets()).get(target)
        if chosen is None:
            raise ServiceError(f"the site has no S3 {target} target")
        full = self.full_key(key)
        with tempfile.TemporaryDirectory(prefix="membria-dr-", dir=dest.parent) as tmp:
            sealed = Path(tmp) / "object.bin"
            try:
                with s3_errors(chosen, f"reading {full}"):
                    response = chosen.client.get_object(Bucket=chosen.bucket, Key=full)
                    with sealed.open("wb") as out:
                        for block in iter(lambda: response["Body"].read(1 << 20), b""):
                            out.write(block)
            except S3Denied as exc:
                if _is_missing(exc):
                    raise MissingObject(f"{full} is missing from the {target} bucket {chosen.bucket}") from None
                raise
            recorded = response.get("Metadata", {}).get(_SHA_META)
            plain = Path(tmp) / "plain"
            digest = hashlib.sha256()
            try:
                with sealed.open("rb") as src, plain.open("wb") as out:
                    for frame in decrypt_stream(self.key, full, src):
                        digest.update(frame)
                        out.write(frame)
            except DecryptError as exc:
                raise CorruptObject(f"{full} in the {target} bucket is corrupt: {exc}") from None
            wanted = expect_sha256 or recorded
            if wanted and digest.hexdigest() != wanted:
                raise CorruptObject(f"{full}: checksum {digest.hexdigest()[:16]}… is not the recorded {wanted[:16]}…")
            os.replace(plain, dest)
        return dest

    def get_bytes(self, key: str, **kwargs: Any) -> bytes:
        with tempfile.TemporaryDirectory(prefix="membria-dr-") as tmp:
            return self.get_file(key, Path(tmp) / "plain", **kwargs).read_bytes()

    def get_json(self, key: str, **kwargs: Any) -> Any:
        data = self.get_bytes(key, **kwargs)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CorruptObject(f"{self.full_key(key)} is not JSON: {exc}") from None

    def exists(self, key: str) -> bool:
        full = self.full_key(key)
        try:
            with s3_errors(self.primary, f"looking for {full}"):
                self.primary.client.head_object(Bucket=self.primary.bucket, Key=full)
        except S3Denied as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and cause.response.get("Error", {}).get("Code") in {
                "404",
                "NoSuchKey",
                "NotFound",
            }:
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the root) under `prefix`, sorted."""
        full = self.full_key(prefix) if prefix else self.root
        keys: list[str] = []
        with s3_errors(self.primary, f"listing {full}"):
            paginator = self.primary.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.primary.bucket, Prefix=full):
                keys.extend(item["Key"][len(self.root) :] for item in page.get("Contents", []))
        return sorted(keys)


def _is_missing(exc: S3Denied) -> bool:
    cause = exc.__cause__
    return isinstance(cause, botocore.exceptions.ClientError) and cause.response.get("Error", {}).get("Code") in {
        "NoSuchKey",
        "404",
        "NoSuchVersion",
    }
