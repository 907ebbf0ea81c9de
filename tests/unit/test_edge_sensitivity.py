"""The edge's sensitivity check: what it finds, the near misses it leaves alone, and that it never echoes a value."""

from __future__ import annotations

import pytest

from runtime.edge.sensitivity import Finding, check, entropy, iban_ok, luhn_ok, redact, scan_text

pytestmark = pytest.mark.unit

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)

POSITIVES = [
    ("email", "Please send it to jane.doe@example.com today", "jane.doe@example.com"),
    ("email", "mail reliability@example.internal about the pump", "reliability@example.internal"),
    ("phone", "call me on +49 30 1234567 after lunch", "+49 30 1234567"),
    ("phone", "my number is (555) 123-4567", "(555) 123-4567"),
    ("phone", "phone: 0171 1234567", "0171 1234567"),
    ("iban", "pay to DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
    ("iban", "IBAN GB82WEST12345698765432.", "GB82WEST12345698765432"),
    ("iban", "nl91abna0417164300 is my account", "nl91abna0417164300"),
    ("payment-card", "card 4111 1111 1111 1111 expires 12/27", "4111 1111 1111 1111"),
    ("payment-card", "amex 3782-822463-10005", "3782-822463-10005"),
    ("payment-card", "5555555555554444", "5555555555554444"),
    ("ssn", "my SSN is 123-45-6789", "123-45-6789"),
    ("ssn", "social security number: 123456789", "123456789"),
    ("national-id", "passport number C01X00T47 expires soon", "C01X00T47"),
    ("national-id", "паспорт 45 01 123456", "45 01 123456"),
    ("private-key", "here: -----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "MIIEow"),
    ("private-key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=", "b3BlbnNzaC1rZXktdjE="),
    ("aws-access-key", "key id AKIAIOSFODNN7EXAMPLE in the config", "AKIAIOSFODNN7EXAMPLE"),
    (
        "aws-secret-key",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    ("jwt", f"my session is {JWT} why does it fail", JWT),
    ("bearer-token", "Authorization: Bearer 8f3kd93kDk39dkF0a9sd8f7", "8f3kd93kDk39dkF0a9sd8f7"),
    ("password", "the db has password=hunter2 set", "hunter2"),
    ("password", 'config: password: "correct horse"', "correct horse"),
    ("password", "the password for the CRM is Summer2024!", "Summer2024!"),
    ("api-key", "api_key = 9f8a7b6c5d4e3f2a1b0c9d8e", "9f8a7b6c5d4e3f2a1b0c9d8e"),
    ("api-key", "token: ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
]


@pytest.mark.parametrize(
    ("kind", "text", "value"), POSITIVES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVES)]
)
def test_finds_pii_and_secrets_without_echoing_them(kind: str, text: str, value: str) -> None:
    findings = check(text)
    assert [f.kind for f in findings] == [kind]
    finding = findings[0]
    assert finding.source == "question"
    assert finding.category == (
        "pii" if kind in {"email", "phone", "iban", "payment-card", "ssn", "national-id"} else "secret"
    )
    assert value not in finding.description
    assert value not in str(finding.to_json())
    assert value not in redact(text, findings)
    assert f"[{kind}]" in redact(text, findings)
    start, end = finding.span or (0, 0)
    assert value in text[start:end] or text[start:end] in value  # the span is the value (a key block runs on)


NEAR_MISSES = [
    "I forgot my password, how do I reset it?",
    "the password is required for the portal",
    "password: reset",
    "password=*****",
    "set password=<your password> in the file",
    "order number 4111 1111 1111 1112",  # Luhn fails
    "reference 1234567890123456",  # no card network starts with 1
    "pay to DE89 3704 0044 0532 0130 01",  # IBAN with a bad checksum
    "GB82 WEST 1234 5698 7654 3",  # too short for a GB IBAN
    "part number 000-12-3456",  # not a valid SSN area
    "serial 123-45-678",  # wrong grouping
    "How do I renew my passport? The photo is 35x45mm",
    "Bearer tokens are used for authentication",
    "api_key = your-api-key-here",
    "token: see the docs",
    "AKIA1234 is not a key",
    "eyJhbGciOi.eyJzdWIiOi.not-a-real-token-at-all",
    "user@localhost has no domain",
    "Orders above 250,000 EUR get 5%; tolerance 0.05 mm; due 2024-01-15",
    "call the shift supervisor on extension 2200",
    "-----BEGIN PUBLIC KEY-----",
    "Valve VX-55 isolates the steam header (16 bar, 210 °C)",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_not_findings(text: str) -> None:
    assert check(text) == []


def test_validators() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")
    assert not iban_ok("DE89 3704 0044 0532 0130 000")  # a German IBAN has 22 characters
    assert entropy("aaaa") == 0.0 and entropy("abcd") == 2.0


def test_several_findings_in_order_and_redacted_together() -> None:
    text = "Send 4111 1111 1111 1111 and password=hunter2 to bob@example.org"
    findings = scan_text(text)
    assert [f.kind for f in findings] == ["payment-card", "password", "email"]
    assert redact(text, findings) == "Send [payment-card] and password=[password] to [email]"


def test_a_card_number_is_not_also_reported_as_a_phone_number() -> None:
    assert [f.kind for f in check("card 4111-1111-1111-1111")] == ["payment-card"]


def test_local_only_chunk_labels() -> None:
    findings = check("How do I close VX-55?", [["safety"], ["local-only", "safety"], ["LOCAL-ONLY"], []])
    assert findings == [
        Finding("local-only-material", "local-only", "2 retrieved chunks labelled 'local-only'", "context")
    ]
    assert check("How do I close VX-55?", [["confidential-local"]])[0].kind == "local-only-material"
    assert check("How do I close VX-55?", [["public"], ["safety"]]) == []


def test_local_only_labels_are_configurable() -> None:
    labels = [["plant-secret"]]
    assert check("q?", labels) == []
    found = check("q?", labels, local_only_labels=["plant-secret"])
    assert [f.kind for f in found] == ["local-only-material"]
    assert check("q?", [["local-only"]], local_only_labels=["plant-secret"]) == []


def test_question_marked_local_only_by_tag_or_keyword() -> None:
    assert [f.kind for f in check("What is our margin? #local-only")] == ["local-only-question"]
    assert [f.kind for f in check("[confidential-local] What is our margin?")] == ["local-only-question"]
    assert check("What is the local-only label for?") == []  # the word, not a tag
    assert check("What is our margin? #local-onlyish") == []
    found = check("This stays INTERNAL   only: the margin?", local_only_keywords=["internal only"])
    assert [f.kind for f in found] == ["local-only-question"]
    assert "internal only" in found[0].description
    assert check("internally only", local_only_keywords=["internal only"]) == []
