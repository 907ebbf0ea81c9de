"""`appliance license ...`: the vendor's signing key, issuing licenses, verifying them as the gateway does."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.output import console, print_ok
from appliance.errors import BadInput, CheckFailed
from appliance.license import generate_signing_key, issue_license
from runtime.common.license import LicenseError, key_id, load_public_key, verify_license

app = typer.Typer(help="Create the signing key, issue licenses and verify them.", no_args_is_help=True)


@app.command()
def keygen(
    private: Path = typer.Option(..., "--private", help="Where to write the private signing key (0600, PEM)."),
    public: Path = typer.Option(..., "--public", help="Where to write the public key the gateway verifies with."),
    force: bool = typer.Option(False, "--force", help="Replace existing key files (orphans issued licenses)."),
) -> None:
    """Create an Ed25519 signing key pair. Keep the private key off the appliance."""
    kid = generate_signing_key(private, public, force=force)
    print_ok(f"signing key {kid} written: private {private} (0600), public {public}")


def _expiry(text: str) -> datetime:
    """A date means the end of that day in UTC; a date-time must name its time zone."""
    try:
        if len(text) == 10:
            return datetime.combine(datetime.strptime(text, "%Y-%m-%d").date(), time(23, 59, 59), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"--expires {text!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    if moment.tzinfo is None:
        raise BadInput(f"--expires {text!r} has no time zone", hint="add one, e.g. 2027-12-31T23:59:59+00:00")
    return moment


@app.command()
def issue(
    key: Path = typer.Option(..., "--key", help="The private signing key (from `appliance license keygen`)."),
    customer: str = typer.Option(..., "--customer", help="Customer name, as it should appear on the license."),
    seats: int = typer.Option(..., "--seats", min=1, help="How many distinct edge devices may connect."),
    expires: str = typer.Option(..., "--expires", help="Expiry: YYYY-MM-DD (end of that day, UTC) or ISO date-time."),
    feature: list[str] = typer.Option([], "--feature", help="A licensed feature (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the signed license (JSON)."),
) -> None:
    """Sign a license for a customer."""
    expires_at = _expiry(expires)
    if expires_at <= datetime.now(UTC):
        raise BadInput(f"--expires {expires} is already past")
    lic = issue_license(key, customer, seats, expires_at, feature, out)
    print_ok(f"license {lic.license_id} for {lic.customer} ({lic.seats} seats) written to {out}")


@app.command()
def verify(
    license_file: Path = typer.Argument(..., metavar="LICENSE", help="The signed license file (JSON)."),
    public_key: Path = typer.Option(..., "--public-key", help="The vendor's public key (PEM)."),
) -> None:
    """Check a license as the gateway does: signature, key, validity dates. Exit 1 if it cannot be used."""
    try:
        lic = verify_license(license_file, public_key)
        kid = key_id(load_public_key(public_key))
    except LicenseError as exc:
        error = BadInput if exc.exit_code == 2 else CheckFailed
        raise error(exc.message) from None
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    days = lic.days_left()
    rows = {
        "license": lic.license_id,
        "customer": lic.customer,
        "seats": str(lic.seats),
        "issued": f"{lic.issued_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
        "expires": f"{lic.expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
        "days left": str(days),
        "features": ", ".join(lic.features) or "none",
        "signed by": kid,
    }
    for name, value in rows.items():
        table.add_row(name, escape(value))
    console.print(table)
    print_ok(f"{license_file} is valid")
