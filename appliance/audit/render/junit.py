"""The report as JUnit XML, for CI systems and test dashboards.

One `testsuite` per target, one `testcase` per result. `fail` is a `<failure>`, `error` an `<error>`,
`not_applicable` and `waived` are `<skipped>` (a waiver's justification, approver and expiry in its message).
Every testcase carries its evidence: in the failure/error/skipped body, or in `<system-out>` when it passed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from appliance.audit.evidence import Evidence
from appliance.audit.report import Report, Result

MESSAGE_CHARS = 500  # a message attribute is a one-liner in most consumers; the body has it all

# Characters XML 1.0 cannot carry at all (a terminal escape in a command's output would make the file
# unreadable): shown as a visible escape instead. Lone surrogates cannot even be encoded as UTF-8.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def printable(text: str) -> str:
    """`text` with the characters XML (and so XHTML) refuses shown as `\\xNN` / `\\uNNNN`."""

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _NOT_XML.sub(escape, text)


def utc(moment: datetime) -> datetime:
    """Aware UTC (a naive time is taken to be UTC already)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc_text(moment: datetime) -> str:
    return utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def evidence_text(items: list[Evidence]) -> str:
    """Every command with its exit status, time, host and output excerpt, as plain text."""
    if not items:
        return "Evidence: none recorded"
    blocks = []
    for item in items:
        status = "not a command" if item.exit_status is None else f"exit {item.exit_status}"
        head = f"$ {item.command}\n  ({status}, {utc_text(item.at)}, on {item.host})"
        output = item.output.rstrip("\n")
        blocks.append(f"{head}\n{output}" if output else head)
    return "Evidence:\n" + "\n\n".join(blocks)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def _classname(result: Result) -> str:
    """`<framework>.<target>`: dashboards group by framework, then by target (dots in a target name would split it)."""
    target = result.target.replace(".", "_")
    return f"{result.frameworks[0].framework}.{target}" if result.frameworks else target


def _body(result: Result, *, with_remediation: bool) -> str:
    refs = ", ".join(f"{ref.framework} {ref.id}" for ref in result.frameworks)
    parts = [f"{result.control} {result.title} [{result.severity}] on {result.target} ({refs})"]
    if result.waiver is not None:
        w = result.waiver
        parts.append(f"Waived until {w.expires.isoformat()}, approved by {w.approver}: {w.justification}")
    if result.message:
        parts.append(result.message)
    if with_remediation:
        parts.append(f"Remediation: {result.remediation}")
    parts.append(evidence_text(result.evidence))
    return printable("\n\n".join(parts) + "\n")


def _testcase(suite: ET.Element, result: Result) -> None:
    case = ET.SubElement(
        suite,
        "testcase",
        classname=printable(_classname(result)),
        name=printable(f"{result.control} {result.title}"),
        time=f"{result.duration_s:.3f}",
    )
    if result.status == "fail":
        failure = ET.SubElement(
            case, "failure", message=printable(_one_line(result.message or "failed")), type=result.severity
        )
        failure.text = _body(result, with_remediation=True)
    elif result.status == "error":
        error = ET.SubElement(
            case, "error", message=printable(_one_line(result.message or "the check could not decide")), type="error"
        )
        error.text = _body(result, with_remediation=True)
    elif result.status == "waived":
        waiver = result.waiver
        message = (
            f"waived: {waiver.justification} (approved by {waiver.approver}, expires {waiver.expires.isoformat()})"
            if waiver
            else "waived"
        )
        skipped = ET.SubElement(case, "skipped", message=printable(_one_line(message)))
        skipped.text = _body(result, with_remediation=True)
    elif result.status == "not_applicable":
        skipped = ET.SubElement(case, "skipped", message=printable(_one_line(result.message or "not applicable")))
        skipped.text = _body(result, with_remediation=False)
    else:
        out = ET.SubElement(case, "system-out")
        out.text = _body(result, with_remediation=False)


def junit_xml(report: Report) -> bytes:
    """The report as a JUnit XML document (UTF-8, with its XML declaration)."""
    stamp = utc(report.generated_at).strftime("%Y-%m-%dT%H:%M:%S")  # JUnit's timestamp has no zone: UTC
    counts = report.counts()
    root = ET.Element(
        "testsuites",
        name=printable(f"membria-audit {report.site}"),
        tests=str(len(report.results)),
        failures=str(counts["fail"]),
        errors=str(counts["error"]),
        skipped=str(counts["waived"] + counts["not_applicable"]),
        time=f"{sum(r.duration_s for r in report.results):.3f}",
        timestamp=stamp,
    )
    targets = {t.name: t for t in report.targets}
    names = list(targets) + sorted({r.target for r in report.results} - set(targets))
    for name in names:
        mine = [r for r in report.results if r.target == name]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=printable(name),
            tests=str(len(mine)),
            failures=str(sum(r.status == "fail" for r in mine)),
            errors=str(sum(r.status == "error" for r in mine)),
            skipped=str(sum(r.status in ("waived", "not_applicable") for r in mine)),
            time=f"{sum(r.duration_s for r in mine):.3f}",
            timestamp=stamp,
            hostname=printable(name),
        )
        properties = ET.SubElement(suite, "properties")
        values = [
            ("site", report.site),
            ("generated_at", utc_text(report.generated_at)),
            ("appliance_version", report.appliance_version),
            ("catalog_digest", report.catalog_digest),
            ("schema_version", str(report.schema_version)),
        ]
        target = targets.get(name)
        if target is not None:
            values += [("target.kind", target.kind), ("target.connection", target.connection)]
            if target.error:
                values.append(("target.error", target.error))
        for key, value in values:
            ET.SubElement(properties, "property", name=key, value=printable(value))
        for result in mine:
            _testcase(suite, result)
        if target is not None and target.error:
            err = ET.SubElement(suite, "system-err")
            err.text = printable(f"the target could not be audited: {target.error}\n")
    ET.indent(root)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document + b"\n"
