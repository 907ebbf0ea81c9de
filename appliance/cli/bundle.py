"""`appliance bundle keygen | build | verify | join`: air-gapped installs carried in on removable media."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from appliance.bundle.build import Reporter
from appliance.cli.common import StateDirOption, load
from appliance.cli.output import console, print_ok
from appliance.cli.progress import ByteBar, byte_bar, human, totals_bar
from appliance.errors import BadInput

app = typer.Typer(
    help=(
        "Air-gapped installs: everything a site's core nodes install (Debian packages with their full dependency "
        "closure, Python wheels including llama-cpp-python, the model files, the appliance itself) in one signed "
        "directory that IT carries in.\n\n"
        "Once: `keygen` (the signing key goes into Vault). On a connected machine: `build SITE -o BUNDLE` "
        "(optionally `--split-size 4G` for removable media). On the air-gapped admin machine: `join` (parts), "
        "`verify`, then `appliance core apply --site SITE --bundle BUNDLE`."
    ),
    no_args_is_help=True,
)


class _RichReporter(Reporter):
    """Steps as lines, pip's and apt's progress as dim details, hashing as a byte progress bar."""

    def step(self, text: str) -> None:
        console.print(f"[bold]›[/] {escape(text)}")

    def detail(self, text: str) -> None:
        console.print(f"  [dim]{escape(text)}[/]", highlight=False)

    def hashing(self, total: int) -> Callable[[int], None]:
        return byte_bar("sha256", total)


@app.command()
def keygen(
    site_file: Path = typer.Option(..., "--site", help="Site file (its bundle: section names the key's places)."),
    state_dir: Path | None = StateDirOption,
    force: bool = typer.Option(False, "--force", help="Replace the key in Vault (old bundles stop verifying)."),
) -> None:
    """Create the Ed25519 bundle signing key in Vault and write its public key to bundle.public_key_file.

    The private key never touches the disk: `build` reads it from Vault for the moment of signing. Copy the
    public key to the air-gapped admin machine out of band; `verify` and `core apply --bundle` trust only it.
    """
    from appliance.bundle import keys

    site = load(site_file)
    kid = keys.keygen(site, state_dir, force=force)
    conf = keys.settings(site)
    print_ok(f"bundle signing key {kid} stored in Vault at {conf.signing_key_vault_path}")
    print_ok(f"public key written to {conf.public_key_file}")


@app.command()
def build(
    site_file: Path = typer.Argument(..., help="The site file the bundle is for (it decides what goes in)."),
    out: Path = typer.Option(..., "-o", "--out", help="The bundle directory to create (must not exist yet)."),
    state_dir: Path | None = StateDirOption,
    skip: list[str] | None = typer.Option(
        None, "--skip", help="Leave a part out (repeatable), e.g. nvidia-cuda where its repository is unreachable."
    ),
    split_size: str | None = typer.Option(
        None, "--split-size", help="Also write the bundle as tar parts of at most this size (e.g. 4G, 700M)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the parts and what they hold; fetch nothing."),
) -> None:
    """Build the signed offline bundle for SITE's core nodes.

    Needs the package registries (Debian, PyPI) and the site's Vault (for the signing key); the air-gapped
    side needs neither. The build is staged beside OUT and renamed into place only when complete and signed.

    Example: appliance bundle build examples/lab.yaml -o /media/usb/membria-lab --split-size 4G
    """
    from appliance.bundle import build as builder
    from appliance.bundle import keys
    from appliance.bundle.parts import parse_size, split

    site = load(site_file)
    skipped = set(skip or [])
    needs = builder.plan(site, skipped)
    part_size = parse_size(split_size) if split_size else None
    table = Table(title=f"bundle parts for site {site.site.name}")
    for column in ("part", "kind", "items", "why"):
        table.add_column(column)
    for need in needs:
        mark = " [yellow](skipped)[/]" if need.group in skipped else ""
        items = ", ".join(need.items)
        shown = items if len(items) < 90 else items[:87] + "..."
        table.add_row(need.group + mark, need.kind, escape(f"{len(need.items)}: {shown}"), need.why)
    console.print(table)
    if dry_run:
        print_ok("dry run: nothing fetched")
        return
    key = keys.signing_key(site, state_dir)  # before any download: a missing key fails in a second
    built = builder.build(site_file, site, out, key, skip=skipped, report=_RichReporter())
    summary = Table(title=f"bundle {out} ({built.seconds:.0f} s)")
    for column in ("part", "files", "size"):
        summary.add_column(column)
    for part, (count, size) in built.sizes.items():
        summary.add_row(part, str(count), human(size))
    console.print(summary)
    if built.manifest.skipped:
        console.print(
            f"[yellow]left out:[/] {', '.join(built.manifest.skipped)} (this bundle does not verify as complete)"
        )
    if part_size:
        parts_dir = out.parent / f"{out.name}-parts"
        parts = split(out, parts_dir, part_size, totals_bar("tar parts"))
        print_ok(f"{len(parts)} part(s) of at most {human(part_size)} in {parts_dir}")
    print_ok(f"bundle {out} built and signed")


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="The bundle directory."),
    site_file: Path | None = typer.Option(
        None, "--site", help="Check completeness against this site file (default: the one signed into the bundle)."
    ),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="The trusted public key (default: the site's bundle.public_key_file)."
    ),
) -> None:
    """Check the signature, every file's size and sha256, that nothing was added, and that the bundle holds
    everything the site's roles install. Exit 1 naming the first bad file; 0 when all is well.

    The trusted key: --public-key, else the site's bundle.public_key_file (with no --site, the path the
    bundle's own site copy names, read from this machine and never from inside the bundle).
    """
    from appliance.bundle import keys
    from appliance.bundle.verify import SITE_COPY
    from appliance.bundle.verify import verify as verify_bundle

    site = load(site_file) if site_file else None
    key_site = site
    if site is None and public_key is None:
        # The key file the bundle's site copy names, read from this machine (placed there out of band);
        # never one inside the bundle itself, which whoever altered the bundle would control.
        key_site = load(bundle / SITE_COPY)
        named = keys.settings(key_site).public_key_file.resolve()
        if named.is_relative_to(bundle.resolve()):
            raise BadInput(f"the bundle's site names a public key inside the bundle ({named}): not trusted")
        console.print(f"trusting the public key {named} (the bundle's site file names it)")
    key = keys.trusted_key(key_site, public_key)
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) if bundle.is_dir() else 0
    with ByteBar("verifying", total) as bar:
        manifest = verify_bundle(bundle, key, site, bar)
    debs, wheels = len(manifest.debs), len(manifest.wheels)
    print_ok(
        f"bundle {bundle} verified: signature, {len(manifest.files)} files, complete for site {manifest.site} "
        f"({debs} Debian packages, {wheels} wheels, {len(manifest.models)} model files)"
    )


@app.command()
def join(
    parts: Path = typer.Argument(..., help="The parts' index (NAME.parts.json) or the first part (NAME.tar.000)."),
    out_parent: Path = typer.Option(..., "-o", "--out", help="Directory to unpack the bundle into."),
) -> None:
    """Check every part's sha256, then unpack the bundle from its parts (carried on removable media)."""
    from appliance.bundle.parts import join as join_parts

    bundle = join_parts(parts, out_parent, totals_bar("unpacking"))
    print_ok(f"bundle unpacked to {bundle}; next: appliance bundle verify {bundle} --site SITE")
