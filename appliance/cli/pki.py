"""`appliance pki ...`: issue certificates from the site PKI (Vault/OpenBao)."""

from __future__ import annotations

from pathlib import Path

import typer

from appliance.backends import Backends
from appliance.cli.common import SiteOption, StateDirOption, lab_state, load
from appliance.cli.output import console, print_ok
from appliance.pki import ROLES, Pki
from runtime.common import atomic

app = typer.Typer(
    help="Issue certificates from the site PKI (the lab's OpenBao or the site's Vault).", no_args_is_help=True
)


def _pki(site_file: Path, state_dir: Path | None) -> Pki:
    site = load(site_file)
    state = lab_state(site, state_dir) if site.services.vault.backend == "embedded" else None
    return Pki.for_site(site, Backends(site, state).vault())


@app.command()
def issue(
    role: str = typer.Argument(..., help=f"Certificate role: {', '.join(ROLES)}."),
    common_name: str = typer.Argument(..., help="CN: a host name for gateway/core, a user or device id otherwise."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for NAME.crt, NAME.key (0600) and ca-chain.pem."),
    alt_name: list[str] = typer.Option([], "--alt-name", help="Extra DNS SAN (repeatable)."),
    ip: list[str] = typer.Option([], "--ip", help="IP SAN (repeatable)."),
    ttl: str | None = typer.Option(None, "--ttl", help="Lifetime, e.g. 24h (bounded by the role's max)."),
    ou: str | None = typer.Option(None, "--ou", help="Department, written to the certificate's OU."),
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
) -> None:
    """Issue a certificate and write it with its private key (never printed)."""
    cert = _pki(site_file, state_dir).issue(role, common_name, alt_names=alt_name, ip_sans=ip, ttl=ttl, ou=ou)
    paths = cert.write(out, common_name)
    print_ok(f"issued {role} certificate for {common_name} (serial {cert.serial_number})")
    for kind, path in paths.items():
        console.print(f"  {kind}: {path}")


@app.command("ca")
def ca(
    out: Path = typer.Option(..., "--out", "-o", help="File for the CA chain (intermediate + root, PEM)."),
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
) -> None:
    """Write the site CA chain that peers use to verify site certificates."""
    atomic.write_text(out, _pki(site_file, state_dir).ca_chain_pem())
    print_ok(f"CA chain written to {out}")


@app.command()
def revoke(
    serial: str = typer.Argument(..., help="Serial number as printed by `pki issue` (hex, colon-separated)."),
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
) -> None:
    """Revoke a certificate. The lab's gateway sees the new CRL at once; on a rack the vault agent renders it."""
    site = load(site_file)
    pki = _pki(site_file, state_dir)
    pki.revoke(serial)
    if site.services.vault.backend == "embedded":
        from appliance.lab.bootstrap import write_crl

        write_crl(lab_state(site, state_dir), pki)
    print_ok(f"revoked {serial}")
