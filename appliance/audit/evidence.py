"""What a check saw: the command, an excerpt of its output, when, and on which host; secrets masked.

Reports leave the site (auditors hand them on), so an excerpt never carries a password hash, a private
key, a token or a recovery key, whatever the check happened to read.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

EXCERPT_BYTES = 2048
MASK = "[redacted]"

# (pattern, replacement): what is kept of a match is only ever its harmless prefix.
_RULES: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys (any algorithm), the whole block
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL), MASK),
    # crypt(3) hashes in shadow-style fields: $6$salt$hash, yescrypt $y$..., bcrypt $2b$...
    (re.compile(r"\$(?:1|2[abxy]?|5|6|7|y|gy|sha1|md5)\$[^\s:]+"), MASK),
    # Vault / OpenBao tokens as they appear in files or environments
    (re.compile(r"\b(?:hvs|hvb|hvr)\.[A-Za-z0-9_-]{20,}"), MASK),
    # key = value and key: value lines whose key names a secret
    (
        re.compile(r"(?i)((?:secret|token|password|passphrase|secret_id|api_key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
        r"\1" + MASK,
    ),
    # systemd-cryptenroll recovery keys: eight groups of eight modhex characters
    (re.compile(r"\b[cbdefghijklnrtuv]{8}(?:-[cbdefghijklnrtuv]{8}){7}\b"), MASK),
]


def redact(text: str) -> str:
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def excerpt(text: str, limit: int = EXCERPT_BYTES) -> str:
    """The redacted output, cut to `limit` characters with a marker saying how much was left out."""
    clean = redact(text)
    if len(clean) <= limit:
        return clean
    return clean[:limit] + f"\n[... {len(clean) - limit} more characters]"


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(description="the command the check ran (or what it did, for checks run from the controller)")
    exit_status: int | None = Field(default=None, description="its exit status; null when it was not a command")
    output: str = Field(description="stdout then stderr, redacted, at most 2 KiB")
    at: datetime = Field(description="when it ran (UTC)")
    host: str = Field(description="the target it ran against")


def record(command: str, output: str, host: str, exit_status: int | None = None) -> Evidence:
    return Evidence(
        command=redact(command),
        exit_status=exit_status,
        output=excerpt(output),
        at=datetime.now(UTC),
        host=host,
    )
