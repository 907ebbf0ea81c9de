"""Licenses: an Ed25519-signed JSON file the gateway checks at start, and a ledger of the device seats in use.

File format (what `appliance license issue` writes)::

    {"license": {...License fields...}, "signature": "<base64 Ed25519>", "key_id": "ed25519:<hex>"}

The signature covers the canonical JSON of the "license" object exactly as it appears in the file (keys sorted,
no spaces, UTF-8), so re-indenting the file does not break it but changing any value does. `key_id` is only a
hint for a better message when the wrong public key is used; trust comes from the signature alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

Reason = Literal["missing", "malformed", "key", "wrong_key", "tampered", "expired", "not_yet_valid"]


class LicenseError(ValueError):
    """A license that cannot be used. `reason` says why; `exit_code` is 2 for bad input, 1 for a failed check."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def exit_code(self) -> int:
        return 2 if self.reason in ("missing", "malformed", "key") else 1


class License(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    license_id: str = Field(min_length=1, max_length=128)
    customer: str = Field(min_length=1, max_length=200)
    seats: StrictInt = Field(gt=0, description="distinct edge devices that may connect")  # `true` is not 1 seat
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    features: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ordered(self) -> License:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be later than issued_at")
        return self

    def days_left(self, now: datetime | None = None) -> int:
        """Whole days until expiry (negative once expired)."""
        return (self.expires_at - (now or datetime.now(UTC))).days

    def has_feature(self, name: str) -> bool:
        return name in self.features


class SignedLicense(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # Kept as raw JSON data: the signature is over these exact values, not over a re-serialised model.
    license: dict[str, Any]
    signature: str
    key_id: str | None = None


def canonical_json(value: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LicenseError("key", f"{path}: no such public key file") from None
    except OSError as exc:
        raise LicenseError("key", f"{path}: cannot read the public key: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise LicenseError("key", f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LicenseError("key", f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def verify_license(path: Path, public_key_path: Path, now: datetime | None = None) -> License:
    """Read `path`, check its signature against the key in `public_key_path` and its validity at `now`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LicenseError("missing", f"{path}: no such license file") from None
    except OSError as exc:
        raise LicenseError("missing", f"{path}: cannot read the license: {exc.strerror or exc}") from None
    return verify_license_bytes(raw, load_public_key(public_key_path), now, source=str(path))


def verify_license_bytes(
    raw: bytes, public_key: Ed25519PublicKey, now: datetime | None = None, *, source: str = "<license>"
) -> License:
    signed = _parse(raw, source)
    lic = _validate(signed, source)
    expected = key_id(public_key)
    if signed.key_id is not None and signed.key_id != expected:
        raise LicenseError(
            "wrong_key", f"{source}: signed by key {signed.key_id}, but the public key given is {expected}"
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
    except (binascii.Error, ValueError):
        raise LicenseError("malformed", f"{source}: malformed license: the signature is not base64") from None
    try:
        public_key.verify(signature, canonical_json(signed.license))
    except InvalidSignature:
        cause = "altered after signing" if signed.key_id else "altered after signing, or signed by another key"
        raise LicenseError("tampered", f"{source}: the signature does not match: the license was {cause}") from None
    _check_dates(lic, now or datetime.now(UTC), source)
    return lic


def _parse(raw: bytes, source: str) -> SignedLicense:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Parsers disagree on which duplicate wins; a signed document must mean one thing to all of them.
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"duplicate key {repeated[0]!r}")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LicenseError("malformed", f"{source}: malformed license: not JSON: {exc}") from None
    try:
        return SignedLicense.model_validate(data)
    except ValidationError as exc:
        raise LicenseError("malformed", f"{source}: malformed license: {_errors(exc)}") from None


def _validate(signed: SignedLicense, source: str) -> License:
    try:
        return License.model_validate(signed.license)
    except ValidationError as exc:
        raise LicenseError("malformed", f"{source}: malformed license: {_errors(exc, 'license')}") from None


def _errors(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _check_dates(lic: License, now: datetime, source: str) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if now < lic.issued_at:
        raise LicenseError(
            "not_yet_valid",
            f"{source}: license {lic.license_id} is not valid before {_when(lic.issued_at)} "
            f"(now {_when(now)}; is this machine's clock right?)",
        )
    if now >= lic.expires_at:
        ago = (now - lic.expires_at).days
        raise LicenseError(
            "expired",
            f"{source}: license {lic.license_id} for {lic.customer} expired on {_when(lic.expires_at)} "
            f"({ago} day{'' if ago == 1 else 's'} ago)",
        )


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


class SeatLedger:
    """The distinct devices that have connected, persisted in SQLite so a restart does not free seats.

    A device already admitted is always admitted again (even if a renewed license has fewer seats); a new device
    is admitted only while fewer than `seats` are recorded. Safe across threads (one lock) and processes (the
    count and the insert run in one IMMEDIATE transaction).
    """

    def __init__(self, path: Path, seats: int) -> None:
        if seats <= 0:
            raise ValueError("seats must be positive")
        self.path = Path(path)
        self.seats = seats
        self._lock = threading.Lock()
        self._known: set[str] = set()  # admitted is forever, so positives can be cached
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit below.
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an admitted seat must survive a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS seats (subject TEXT PRIMARY KEY, first_seen TEXT NOT NULL)")

    def admit(self, device_subject: str) -> bool:
        if not device_subject:
            raise ValueError("device subject is empty")
        with self._lock:
            if device_subject in self._known:
                return True
            self._db.execute("BEGIN IMMEDIATE")  # takes the write lock first: no other process counts meanwhile
            try:
                known = self._db.execute("SELECT 1 FROM seats WHERE subject = ?", (device_subject,)).fetchone()
                if known is None:
                    (used,) = self._db.execute("SELECT count(*) FROM seats").fetchone()
                    if used >= self.seats:
                        self._db.execute("ROLLBACK")
                        return False
                    now = datetime.now(UTC).isoformat()
                    self._db.execute("INSERT INTO seats (subject, first_seen) VALUES (?, ?)", (device_subject, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._known.add(device_subject)
            return True

    def admitted(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT subject FROM seats ORDER BY first_seen, subject")]

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM seats").fetchone()
            return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
