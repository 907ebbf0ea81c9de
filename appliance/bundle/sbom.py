"""CycloneDX 1.6 SBOM of a bundle: every deb, wheel and model file it carries, built with cyclonedx-python-lib.

The document is a pure function of its inputs (no wall clock, no random serial), so rebuilding the same bundle
gives the same bytes and the SBOM can be signed and compared like any other bundle file.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

from cyclonedx.exception.model import InvalidUriException
from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component as CdxComponent
from cyclonedx.model.component import ComponentType
from cyclonedx.model.license import DisjunctiveLicense, License, LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.spdx import fixup_id, is_expression
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from appliance.errors import BadInput, CheckFailed

Kind = Literal["deb", "wheel", "model", "application"]

_TYPES: dict[str, ComponentType] = {
    "deb": ComponentType.LIBRARY,
    "wheel": ComponentType.LIBRARY,
    "model": ComponentType.MACHINE_LEARNING_MODEL,
    "application": ComponentType.APPLICATION,
}
# Property names are namespaced, as CycloneDX asks of anything outside its own taxonomy.
_PROP = "membria:bundle:"
# Fixed namespace for serials derived from the inputs: same inputs, same urn:uuid.
_SERIAL_NAMESPACE = uuid.UUID("5b0f3c1e-6f55-4f0e-9a77-0d4f1c2b7e21")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"(https?|ftp|file)://\S+")


@dataclass(frozen=True)
class Component:
    kind: Kind
    name: str
    version: str
    file: str  # posix path inside the bundle; also the bom-ref, so it must be unique
    sha256: str  # hex
    size: int
    purl: str | None = None
    source: str = ""  # a URL, "built from this checkout", "inside wheel X"
    licenses: tuple[str, ...] = ()  # SPDX ids, one SPDX expression, or free-text names


def sbom_document(
    subject_name: str,
    subject_version: str,
    components: Sequence[Component],
    *,
    created: datetime,
    serial: uuid.UUID | None = None,
) -> str:
    """CycloneDX 1.6 JSON describing the bundle `subject_name`@`subject_version` and the files it carries.

    metadata.component is the bundle (type application) and depends on every component; each component has
    bom-ref = its file, a SHA-256 hash, its purl, licenses, properties naming kind/file/size/source, and a
    distribution external reference when `source` is a URL. `created` must be timezone-aware. Without `serial`,
    one is derived from a hash of all inputs, so the output is byte-for-byte deterministic.
    """
    if created.tzinfo is None or created.utcoffset() is None:
        raise BadInput("SBOM creation time must be timezone-aware", hint="use datetime.now(UTC) or a parsed ISO time")
    _check_unique(subject_name, subject_version, components)
    root = CdxComponent(
        name=subject_name,
        version=subject_version,
        type=ComponentType.APPLICATION,
        bom_ref=_root_ref(subject_name, subject_version),
    )
    parts = [_component(c) for c in components]
    bom = Bom(
        serial_number=serial or _derived_serial(subject_name, subject_version, components, created),
        metadata=BomMetaData(component=root, timestamp=created),
        components=parts,
    )
    # Declaring the edges keeps the library from warning that the described component has no dependencies.
    bom.register_dependency(root, parts)
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"


def validate(document: str) -> None:
    """Check `document` against the CycloneDX 1.6 JSON schema shipped inside cyclonedx-python-lib (no network)."""
    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(document)
    except json.JSONDecodeError as exc:
        raise CheckFailed(f"SBOM is not valid JSON: {exc}") from exc
    if error is not None:
        raise CheckFailed(f"SBOM does not validate against CycloneDX 1.6: {_describe(error.data)}")


def _describe(data: object) -> str:
    # data is the jsonschema ValidationError; its path says where, its message says what.
    message = getattr(data, "message", str(data))
    path = "/".join(str(p) for p in getattr(data, "absolute_path", ()))
    return f"{message} (at /{path})" if path else str(message)


def _root_ref(name: str, version: str) -> str:
    return f"bundle:{name}@{version}"


def _check_unique(subject_name: str, subject_version: str, components: Sequence[Component]) -> None:
    seen = {_root_ref(subject_name, subject_version)}
    for c in components:
        if c.file in seen:
            raise BadInput(f"SBOM component file {c.file!r} appears twice (it is the bom-ref, so it must be unique)")
        seen.add(c.file)


def _component(c: Component) -> CdxComponent:
    if c.kind not in _TYPES:
        raise BadInput(f"SBOM component {c.file}: unknown kind {c.kind!r}")
    sha = c.sha256.lower()
    if not _SHA256.fullmatch(sha):
        raise BadInput(f"SBOM component {c.file}: sha256 is not 64 hex digits: {c.sha256!r}")
    properties = [
        Property(name=_PROP + "kind", value=c.kind),
        Property(name=_PROP + "file", value=c.file),
        Property(name=_PROP + "size", value=str(c.size)),
    ]
    if c.source:
        properties.append(Property(name=_PROP + "source", value=c.source))
    return CdxComponent(
        name=c.name,
        version=c.version or None,  # a model file inside a wheel may have no version of its own
        type=_TYPES[c.kind],
        bom_ref=c.file,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha)],
        purl=_purl(c),
        licenses=_licenses(c.licenses),
        external_references=_references(c.source),
        properties=properties,
    )


def _purl(c: Component) -> PackageURL | None:
    if not c.purl:
        return None
    try:
        return PackageURL.from_string(c.purl)
    except ValueError as exc:
        raise BadInput(f"SBOM component {c.file}: bad purl {c.purl!r}: {exc}") from exc


def _licenses(values: tuple[str, ...]) -> list[License]:
    # The schema takes either a list of single licenses or exactly one expression, never both.
    if len(values) == 1 and fixup_id(values[0]) is None and is_expression(values[0]):
        return [LicenseExpression(values[0])]
    out: list[License] = []
    for value in values:
        spdx_id = fixup_id(value)
        out.append(DisjunctiveLicense(id=spdx_id) if spdx_id else DisjunctiveLicense(name=value))
    return out


def _references(source: str) -> list[ExternalReference]:
    if not _URL.fullmatch(source):
        return []
    try:
        url = XsUri(source)
    except InvalidUriException:
        return []  # the source property still records it verbatim
    return [ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=url)]


def _derived_serial(
    subject_name: str, subject_version: str, components: Sequence[Component], created: datetime
) -> uuid.UUID:
    canonical = json.dumps(
        {
            "name": subject_name,
            "version": subject_version,
            "created": created.isoformat(),
            "components": sorted((asdict(c) for c in components), key=lambda d: str(d["file"])),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return uuid.uuid5(_SERIAL_NAMESPACE, hashlib.sha256(canonical.encode()).hexdigest())
