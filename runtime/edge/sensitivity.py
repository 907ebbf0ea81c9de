"""What must never leave the device: personal data, secrets and material labelled local-only.

`check(question, chunk_labels)` looks at the question's text and at the labels of the chunks retrieved for it
(the chunks themselves never leave the device; a question answered from local-only material must not either,
or the core's answer would be built without it and the question would carry its context away).

Detectors are patterns with a validation step where the format has one (IBAN mod-97, Luhn for cards, SSN
ranges, JWT headers that decode, entropy for key-like values), so that near misses (a 16-digit order number,
the word "password" with no value) are not findings. A finding names its kind and where it was, never the
matched text: findings are logged and shown with every routing decision.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Category = Literal["pii", "secret", "local-only"]
Source = Literal["question", "context"]

DEFAULT_LOCAL_ONLY_LABELS: tuple[str, ...] = ("local-only", "confidential-local")


@dataclass(frozen=True)
class Finding:
    kind: str  # "email", "iban", "private-key", "local-only-material", ...
    category: Category
    description: str  # redacted: says what and where, never the value
    source: Source
    span: tuple[int, int] | None = None  # character offsets in the question

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Span = tuple[int, int]
Detector = Callable[[str], Iterator[Span]]


# --- validation helpers ----------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: country length (where known) and the mod-97 check."""
    iban = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", iban):
        return False
    expected = _IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    if not value:
        return 0.0
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24,
    "DE": 22, "DK": 18, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "XK": 20,
}  # fmt: skip

# Issuer prefixes of the card networks people paste: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro.
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6011|65|64[4-9]|35|30[0-5]|36|38|62|67)")


# --- detectors: each yields the spans it is sure about ----------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?![\w-])")
# Not inside a longer run of digit groups (an IBAN or account number written in blocks of four).
_PHONE_NANP = re.compile(r"(?<![\w-])(?<!\d )\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?![\w-])(?! ?\d)")
_PHONE_TRUNK = re.compile(r"(?<![\w-])(?<!\d )0\d{2,4}[ /-]\d{3,4}[ -]?\d{3,4}(?![\w-])(?! ?\d)")
_PHONE_WORD = re.compile(
    r"\b(?:phone|telephone|tel|mobile|cell|whatsapp|телефон)\b\.?(?:\s*(?:number|no\.?|#|номер))?\s*[:#]?\s*"
    r"(\+?\d[\d ().-]{5,}\d)",
    re.IGNORECASE,
)
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\w-])(\d{3})-(\d{2})-(\d{4})(?![\w-])")
_SSN_WORD = re.compile(
    r"\b(?:ssn|social security(?: number| no\.?)?)\b\s*[:#]?\s*(\d{3}[ -]?\d{2}[ -]?\d{4})(?!\d)", re.IGNORECASE
)
_ID_WORD = re.compile(
    r"\b(passport|national id(?:entity)?(?: card| number)?|identity card|id card|personal identification number|"
    r"tax (?:id|identification number)|driver'?s licen[cs]e|паспорт\w*|снилс|инн)\b",
    re.IGNORECASE,
)
_ID_VALUE = re.compile(r"(?<![\w-])(?:\d{2} ?\d{2} ?\d{6}|\d{3}-\d{3}-\d{3} ?\d{2}|[A-Za-z0-9]{6,14})(?![\w-])")

_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_AWS_KEY_ID = re.compile(
    r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"
)
_AWS_SECRET = re.compile(r"aws_secret_access_key\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])", re.IGNORECASE)
_JWT = re.compile(r"(?<![\w-])(eyJ[A-Za-z0-9_-]{8,})\.(eyJ[A-Za-z0-9_-]{8,})\.([A-Za-z0-9_-]{16,})(?![\w-])")
_BEARER = re.compile(r"\bBearer\s+([A-Za-z0-9._~+/-]{16,}=*)(?![\w.~+/=-])")
_PASSWORD_WORD = re.compile(r"\b(?:password|passwd|pwd|passphrase|passcode|пароль)\b", re.IGNORECASE)
# The value follows the word directly ("password hunter2"), or the first ':', '=' or ' is ' within a few words
# ("the password for the CRM is Summer2024!").
_PASSWORD_VALUE = re.compile(
    r"(?:[^\n:=]{0,40}?)(\s*[:=]\s*|\s+is\s+)(\"[^\"\n]{1,200}\"|'[^'\n]{1,200}'|<[^>\n]{1,60}>|[^\s,;]+)",
    re.IGNORECASE,
)
_PASSWORD_NEXT = re.compile(r"\s+([^\s,;]+)")
_KEY_ASSIGN = re.compile(
    r"\b(?:api[_-]?key|apikey|secret[_-]?key|client[_-]?secret|access[_-]?token|auth[_-]?token|refresh[_-]?token|"
    r"private[_-]?token|token|secret)\b\s*[:=]\s*[\"']?([A-Za-z0-9_./+~-]{16,}=*)",
    re.IGNORECASE,
)
_KNOWN_TOKENS = re.compile(
    r"(?<![\w-])(?:ghp_[A-Za-z0-9]{36}|gho_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,}|xox[abprs]-[A-Za-z0-9-]{10,}|"
    r"sk-[A-Za-z0-9_-]{20,}|sk_live_[A-Za-z0-9]{20,}|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20})(?![\w-])"
)
_PLACEHOLDER = re.compile(r"^(?:\*+|x+|\.+|<[^>]*>|\$\{[^}]*\}|\{\{[^}]*\}\}|%[^%]*%|none|null|empty|redacted|hidden)$")


def _emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def _phones(text: str) -> Iterator[Span]:
    for pattern, low, high in ((_PHONE_INTL, 8, 15), (_PHONE_NANP, 10, 10), (_PHONE_TRUNK, 9, 12)):
        for m in pattern.finditer(text):
            if low <= sum(ch.isdigit() for ch in m.group()) <= high:
                yield m.span()
    for m in _PHONE_WORD.finditer(text):
        if 7 <= sum(ch.isdigit() for ch in m.group(1)) <= 15:
            yield m.span(1)


def _ibans(text: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        # The pattern may run on into a following word ("DE89 3704 0044 0532 0130 00 ABC"): where the country's
        # length is known, the IBAN is that many characters, and must end at a word boundary.
        length = _IBAN_LENGTHS.get(m.group()[:2].upper())
        positions = [m.start() + i for i, ch in enumerate(m.group()) if ch != " "]
        if length is None:
            if iban_ok(m.group()):
                yield m.span()
        elif len(positions) >= length:
            end = positions[length - 1] + 1
            if (end == len(text) or not text[end].isalnum()) and iban_ok(text[m.start() : end]):
                yield (m.start(), end)


def _cards(text: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and _CARD_PREFIX.match(digits) and luhn_ok(digits):
            yield m.span()


def _ssn_valid(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ssns(text: str) -> Iterator[Span]:
    for m in _SSN.finditer(text):
        if _ssn_valid(*m.groups()):
            yield m.span()
    for m in _SSN_WORD.finditer(text):
        digits = re.sub(r"\D", "", m.group(1))
        if _ssn_valid(digits[:3], digits[3:5], digits[5:]):
            yield m.span(1)


def _national_ids(text: str) -> Iterator[Span]:
    """An id-like value (6+ characters, 5+ digits) within a few words after "passport", "national id", ..."""
    for word in _ID_WORD.finditer(text):
        window_end = min(len(text), word.end() + 40)
        for value in _ID_VALUE.finditer(text, word.end(), window_end):
            if sum(ch.isdigit() for ch in value.group()) >= 5:
                yield value.span()
                break


def _private_keys(text: str) -> Iterator[Span]:
    for m in _PRIVATE_KEY.finditer(text):
        end = text.find("-----END", m.end())
        yield (m.start(), len(text) if end < 0 else end)


def _aws_keys(text: str) -> Iterator[Span]:
    for m in _AWS_KEY_ID.finditer(text):
        yield m.span()


def _aws_secrets(text: str) -> Iterator[Span]:
    for m in _AWS_SECRET.finditer(text):
        yield m.span(1)


def _jwts(text: str) -> Iterator[Span]:
    for m in _JWT.finditer(text):
        if _jwt_header_ok(m.group(1)):
            yield m.span()


def _jwt_header_ok(segment: str) -> bool:
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and ("alg" in header or "typ" in header)


def _bearers(text: str) -> Iterator[Span]:
    for m in _BEARER.finditer(text):
        if _looks_random(m.group(1), min_length=16):
            yield m.span(1)


def _passwords(text: str) -> Iterator[Span]:
    for word in _PASSWORD_WORD.finditer(text):
        m = _PASSWORD_VALUE.match(text, word.end(), min(len(text), word.end() + 250))
        if m is not None and _password_value(m.group(2), assignment=m.group(1).strip() == "="):
            yield m.span(2)
            continue
        m = _PASSWORD_NEXT.match(text, word.end())
        if m is not None and _password_value(m.group(1), assignment=False):
            yield m.span(1)


def _password_value(value: str, *, assignment: bool) -> bool:
    """Whether what follows "password" is one: after '=' or in quotes anything but a placeholder is; after ':' or
    "is" it must not look like a word ("password: reset", "the password is required" are not passwords)."""
    quoted = value[:1] in "\"'"
    bare = value.strip("\"'").rstrip(".!?)")
    if len(bare) < 4 or _PLACEHOLDER.match(bare.lower()):
        return False
    if assignment or quoted:
        return True
    mixed_case = bare != bare.lower() and bare != bare.title()
    return len(bare) >= 6 and (any(ch.isdigit() for ch in bare) or not bare.isalnum() or mixed_case)


def _api_keys(text: str) -> Iterator[Span]:
    for m in _KEY_ASSIGN.finditer(text):
        if _looks_random(m.group(1), min_length=16):
            yield m.span(1)
    for m in _KNOWN_TOKENS.finditer(text):
        yield m.span()


def _looks_random(value: str, *, min_length: int) -> bool:
    """A key rather than a word: long, letters and digits mixed, high entropy ("your-api-key-here" is not)."""
    if len(value) < min_length or _PLACEHOLDER.match(value.lower()):
        return False
    has_digit = any(ch.isdigit() for ch in value)
    has_alpha = any(ch.isalpha() for ch in value)
    return has_digit and has_alpha and entropy(value) >= 3.0


# Order matters: a span claimed by an earlier detector is not reported again by a later one (a card number is not
# also a phone number, a JWT after "Bearer" is reported as a JWT).
_DETECTORS: tuple[tuple[str, Category, str, Detector], ...] = (
    ("private-key", "secret", "a private key block", _private_keys),
    ("aws-access-key", "secret", "an AWS access key id", _aws_keys),
    ("aws-secret-key", "secret", "an AWS secret access key", _aws_secrets),
    ("jwt", "secret", "a JSON web token", _jwts),
    ("bearer-token", "secret", "a bearer token", _bearers),
    ("api-key", "secret", "an API key or token", _api_keys),
    ("password", "secret", "a password", _passwords),
    ("iban", "pii", "an IBAN (valid checksum)", _ibans),
    ("payment-card", "pii", "a payment card number (valid Luhn checksum)", _cards),
    ("ssn", "pii", "a US social security number", _ssns),
    ("national-id", "pii", "a passport or national id number", _national_ids),
    ("email", "pii", "an email address", _emails),
    ("phone", "pii", "a phone number", _phones),
)


# --- the check -------------------------------------------------------------------------------------------


def scan_text(text: str) -> list[Finding]:
    """PII and secrets in `text` (the question), in order of appearance."""
    claimed: list[Span] = []
    found: list[Finding] = []
    for kind, category, what, detector in _DETECTORS:
        for start, end in detector(text):
            if any(start < e and s < end for s, e in claimed):
                continue
            claimed.append((start, end))
            description = f"{what} in the question (characters {start}-{end})"
            found.append(Finding(kind, category, description, "question", (start, end)))
    return sorted(found, key=lambda f: f.span or (0, 0))


def check(
    question: str,
    chunks_labels: Iterable[Sequence[str]] = (),
    *,
    local_only_labels: Iterable[str] = DEFAULT_LOCAL_ONLY_LABELS,
    local_only_keywords: Iterable[str] = (),
) -> list[Finding]:
    """Everything that keeps this question on the device: PII and secrets in it, retrieved chunks labelled
    local-only, and a question marked local-only (a `#label` / `[label]` tag of a local-only label, or one of
    `local_only_keywords` as a phrase)."""
    labels = tuple(dict.fromkeys(label.strip().lower() for label in local_only_labels if label.strip()))
    found = scan_text(question)

    counts: Counter[str] = Counter()
    for chunk in chunks_labels:
        for label in {str(x).strip().lower() for x in chunk} & set(labels):
            counts[label] += 1
    for label in labels:
        if counts[label]:
            n = counts[label]
            what = f"{n} retrieved chunk{'s' if n > 1 else ''} labelled '{label}'"
            found.append(Finding("local-only-material", "local-only", what, "context"))

    for label in labels:
        tag = re.compile(rf"(?<![\w-])(?:#{re.escape(label)}|\[{re.escape(label)}\])(?![\w-])", re.IGNORECASE)
        m = tag.search(question)
        if m:
            what = f"the question is tagged '{label}' (characters {m.start()}-{m.end()})"
            found.append(Finding("local-only-question", "local-only", what, "question", m.span()))
    for keyword in local_only_keywords:
        words = keyword.split()
        if not words:
            continue
        phrase = re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)
        m = phrase.search(question)
        if m:
            what = f"the question names the local-only keyword '{keyword}' (characters {m.start()}-{m.end()})"
            found.append(Finding("local-only-question", "local-only", what, "question", m.span()))
    return found


def redact(text: str, findings: Iterable[Finding]) -> str:
    """`text` with every finding's span replaced by its kind, e.g. "mail [email] now" (for logs)."""
    spans = sorted((f.span, f.kind) for f in findings if f.span is not None and f.source == "question")
    out, last = [], 0
    for (start, end), kind in spans:
        if start < last:
            continue
        out.append(text[last:start] + f"[{kind}]")
        last = end
    return "".join(out) + text[last:]
