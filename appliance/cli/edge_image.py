"""`appliance edge keygen | build | verify | flash | enroll-token | recovery-key | wipe`: the field technician's side of
edge images, and the admin's side of enrolling the laptops flashed with them.

Registered on the `edge` command group (appliance/cli/edge.py) beside the agent commands. The work is done by
`edge_image` (no site file, no Vault there); this module reads the site for keys and shows progress.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.common import StateDirOption, load
from appliance.cli.output import console, print_ok
from appliance.cli.progress import ByteBar, human
from appliance.errors import BadInput, CheckFailed
from appliance.site import Site
from edge_image.build import Reporter


def _site(site_file: Path | None) -> Site | None:
    return load(site_file) if site_file is not None else None


def _progress() -> tuple[Callable[[str, int], Callable[[int], None]], list[ByteBar]]:
    """A factory of byte bars for edge_image's progress callbacks, and the list to close them on error."""
    bars: list[ByteBar] = []

    def make(label: str, total: int) -> Callable[[int], None]:
        bar = ByteBar(label, total)
        bars.append(bar)
        return bar

    return make, bars


def keygen(
    site_file: Path = typer.Option(..., "--site", help="Site file (its edge.signing section names the key's places)."),
    state_dir: Path | None = StateDirOption,
    force: bool = typer.Option(False, "--force", help="Replace the key in Vault (old images stop verifying)."),
) -> None:
    """Create the Ed25519 image signing key in Vault and write its public key to edge.signing.public_key_file.

    The private key never touches the disk: `edge build` reads it from Vault for the moment of signing. Give the
    public key to field technicians out of band; `edge verify` and `edge flash` trust only it.
    """
    from appliance.edge import keys

    site = load(site_file)
    kid = keys.keygen(site, state_dir, force=force)
    conf = keys.settings(site)
    print_ok(f"edge image signing key {kid} stored in Vault at {conf.signing_key_vault_path}")
    print_ok(f"public key written to {conf.public_key_file}")


class _RichReporter(Reporter):
    """Steps as lines, tool output as dim details, long byte work as progress bars."""

    def __init__(self) -> None:
        self.bars: list[ByteBar] = []

    def step(self, text: str) -> None:
        console.print(f"[bold]›[/] {escape(text)}")

    def detail(self, text: str) -> None:
        console.print(f"  [dim]{escape(text)}[/]", highlight=False)

    def progress(self, label: str, total: int) -> Callable[[int], None]:
        bar = ByteBar(label, total)
        self.bars.append(bar)
        return bar

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def build(
    site_file: Path = typer.Option(..., "--site", help="Site file (edge profiles, PKI, the signing key's places)."),
    profile: str = typer.Option(..., "--profile", help="The edge profile the image is for."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (must not exist yet)."),
    state_dir: Path | None = StateDirOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what the image would hold; build nothing."),
) -> None:
    """Build a signed laptop image for one edge profile: Debian 12 with the edge agent and its model, LUKS2
    (AES-256-XTS, argon2id) around the root filesystem, systemd-boot, and first-boot units that give each laptop
    its own volume key and bind it to its TPM.

    Needs root, the Debian and PyPI registries (the first build caches the rootfs and a portable llama.cpp build),
    and the site's Vault (the CA chain and the signing key). Writes OUT/: the image, its block map, the manifest
    and its signature, a CycloneDX SBOM and a listing of every file in the root filesystem.

    Example: appliance edge build --site examples/lab.yaml --profile engineering-laptop -o out/
    """
    from appliance.edge import build as builder

    site = load(site_file)
    spec, model = builder.plan(site, profile)
    table = Table(title=f"edge image: site {site.site.name}, profile {profile}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("Debian", f"{spec.debian_suite}: {len(spec.all_packages)} packages (+{len(spec.packages)} profile)")
    table.add_row("disk", f"ESP {spec.esp_size_mb} MiB + LUKS2 root {spec.root_size_mb} MiB (grows at first boot)")
    table.add_row("TPM2", f"PCRs {', '.join(map(str, spec.tpm2_pcrs))}" + (" + PIN" if spec.tpm2_pin else ""))
    table.add_row("model", f"{model} -> {spec.agent['model']['path']}")
    table.add_row("users", ", ".join(u.name for u in spec.users) or "(none: no SSH logins)")
    table.add_row("gateways", ", ".join(spec.gateways))
    console.print(table)
    if dry_run:
        print_ok("dry run: nothing built")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} already exists", hint="choose a new output directory (images are never overwritten)")
    reporter = _RichReporter()
    try:
        built = builder.build(site, profile, out, state_dir=state_dir, report=reporter, log=reporter.detail)
    finally:
        reporter.close()
    summary = Table(title=f"built {out} in {built.seconds:.0f} s")
    summary.add_column("stage")
    summary.add_column("seconds", justify="right")
    for name, seconds in built.stages.items():
        summary.add_row(name, f"{seconds:.0f}")
    console.print(summary)
    m = built.manifest
    print_ok(
        f"{m.image}: {len(m.packages)} packages, {len(m.wheels)} wheels, signed; "
        f"check it with `appliance edge verify {out}`"
    )


SiteKeyOption = typer.Option(None, "--site", help="Site file: trust its edge.signing.public_key_file.")
PublicKeyOption = typer.Option(None, "--public-key", help="The trusted public key file (instead of --site).")


def verify(
    image: Path = typer.Argument(..., help="The image file (.img) or the build's output directory."),
    site_file: Path | None = SiteKeyOption,
    public_key: Path | None = PublicKeyOption,
    bootstrap_key: Path | None = typer.Option(
        None, "--bootstrap-key", help="Decrypt with this key file instead of the one on the image's ESP."
    ),
    fsck: bool = typer.Option(False, "--fsck", help="Also run e2fsck -fn on a decrypted copy (needs free disk)."),
) -> None:
    """Prove an image is the one that was signed and intact: signature, every file's sha256, the GPT, the ESP's
    files and boot entries, the LUKS2 header (cipher, key size, PBKDF, keyslots, tokens), and the root filesystem,
    decrypted offline with the bootstrap key and compared with the signed sha256.

    Every check runs and is listed; exit 1 if any fails, 0 when all pass.

    Example: appliance edge verify out/ --site examples/lab.yaml
    """
    from appliance.edge import keys
    from edge_image.verify import verify as verify_image

    key = keys.trusted_key(_site(site_file), public_key)
    secret: bytes | None = None
    if bootstrap_key is not None:
        if not bootstrap_key.is_file():
            raise BadInput(f"{bootstrap_key}: no such key file")
        secret = bootstrap_key.read_bytes()
    progress, bars = _progress()
    try:
        manifest, checks = verify_image(image, key, bootstrap_key=secret, fsck=fsck, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    table = Table(title=f"edge image {escape(str(image))}")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, "[green]ok[/]" if check.ok else "[red]FAILED[/]", escape(check.detail))
    console.print(table)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CheckFailed(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    assert manifest is not None  # every check passed, so the signature did
    print_ok(f"image for site {manifest.site}, profile {manifest.profile}, {manifest.appliance_version}: intact")


def flash(
    image: Path = typer.Argument(..., help="The image file (.img) or the build's output directory."),
    target: Path = typer.Argument(..., help="The laptop's whole disk (e.g. /dev/sdb) or a regular file."),
    site_file: Path | None = SiteKeyOption,
    public_key: Path | None = PublicKeyOption,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before overwriting the target."),
    discard: bool = typer.Option(True, "--discard/--no-discard", help="Discard the whole target first."),
    full_verify: bool = typer.Option(False, "--verify", help="Run `edge verify` on the image before writing."),
    enrollment_file: Path | None = typer.Option(
        None,
        "--enrollment",
        help="The laptop's token file from `edge enroll-token`: put into the ESP as membria/enroll.json and read back.",
    ),
) -> None:
    """Write an image onto a disk: only its mapped ranges (bmaptool), each checked as read, then read back from
    the target and compared with the block map's sha256.

    With --enrollment FILE, the file is checked first (format, device name, not expired, the image's site) and,
    after the read-back, written into the target's ESP as membria/enroll.json, read back and compared; first boot
    enrolls the laptop with it. Its token is never shown.

    Refuses a disk that is mounted, swap, held by dm/md/LVM, or that holds this system's /, /usr, /boot or /efi;
    a partition (flash writes whole disks); a disk smaller than the image. Asks before writing unless --yes (and
    refuses to guess when no one can answer). A regular file as TARGET is allowed (tests, later `dd`).

    Example: appliance edge flash out/ /dev/sdb --site examples/lab.yaml
    """
    from appliance.edge import keys
    from edge_image import flash as flasher
    from edge_image.manifest import check_signature
    from edge_image.verify import image_dir
    from edge_image.verify import verify as verify_image
    from runtime.common.signed_manifest import hash_file

    key = keys.trusted_key(_site(site_file), public_key)
    directory = image_dir(image)
    manifest = check_signature(directory, key)
    img, bmap_path = directory / manifest.image, directory / manifest.bmap
    if not img.is_file() or img.stat().st_size != manifest.files[manifest.image].size:
        raise CheckFailed(f"{img}: missing or not the signed size", hint="run `appliance edge verify` on it")
    if not bmap_path.is_file() or hash_file(bmap_path).sha256 != manifest.files[manifest.bmap].sha256:
        raise CheckFailed(f"{bmap_path}: not the signed block map", hint="run `appliance edge verify` on it")
    enrollment = None
    if enrollment_file is not None:
        enrollment = flasher.load_enrollment(enrollment_file, site=manifest.site)
        console.print(f"enrollment: device {escape(enrollment.device)}, token expires {enrollment.expires}")
    if full_verify:
        _, checks = verify_image(directory, key)
        failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
        if failed:
            raise CheckFailed("the image does not verify: " + "; ".join(failed))
        print_ok("image verified")
    info = flasher.check_target(target, img, manifest.files[manifest.image].size)
    what = info.kind if info.kind == "file" else " ".join(x for x in (info.model, info.transport) if x) or "disk"
    console.print(f"target {escape(str(info.path))}: {escape(what)}, {human(info.size)}")
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("refusing to overwrite the target without confirmation", hint="pass --yes")
        with_enrollment = f" with the enrollment of {enrollment.device}" if enrollment is not None else ""
        typer.confirm(f"Erase {info.path} and write {manifest.image}{with_enrollment} onto it?", abort=True)
    bars: list[ByteBar] = []

    def on_progress(done: int, total: int) -> None:
        if not bars:
            bars.append(ByteBar("writing", total))
        bars[0](done - bars[0].done)

    try:
        report = flasher.flash(img, bmap_path, target, discard=discard, on_progress=on_progress, enrollment=enrollment)
    finally:
        for bar in bars:
            bar.close()
    print_ok(
        f"{human(report.mapped_bytes)} of {human(report.image_size)} written to {target} in "
        f"{report.copy_seconds:.1f} s ({report.mb_per_s:.0f} MB/s), read back and checked in "
        f"{report.readback_seconds:.1f} s"
    )
    if enrollment is not None:
        print_ok(
            f"enrollment of {enrollment.device} (expires {enrollment.expires}) written to the ESP as "
            f"{report.enrollment}, read back and checked"
        )


def enroll_token(
    site_file: Path = typer.Option(..., "--site", help="Site file (edge profiles, Vault, PKI, gateways)."),
    device: str = typer.Option(..., "--device", help="The laptop's name: its certificate will be DEVICE.<domain>."),
    profile: str | None = typer.Option(None, "--profile", help="The laptop's edge profile (its department)."),
    ttl: str = typer.Option("72h", "--ttl", help="How long the token may be used (s, m, h or d; at most 30d)."),
    out: Path | None = typer.Option(None, "-o", "--out", help="The token file to write (0600), for the ESP."),
    state_dir: Path | None = StateDirOption,
    revoke: bool = typer.Option(False, "--revoke", help="Revoke the device's outstanding token instead."),
    resolve: list[str] | None = typer.Option(
        None,
        "--resolve",
        metavar="NAME=ADDR",
        help="Goes into FILE for the laptop's /etc/hosts, where it cannot resolve NAME (lab, boot test); repeatable.",
    ),
) -> None:
    """Mint the one-laptop enrollment token (a Vault token: orphan, 6 uses, not renewable, allowed only to
    escrow DEVICE's recovery key and get DEVICE.<domain> signed) and write it with the gateways to FILE.

    FILE goes onto the laptop's ESP at flash time; first boot posts it to the gateway's /v1/enroll. Vault keeps
    the token's accessor at membria/edge/devices/DEVICE; `--revoke` revokes the outstanding token by it.
    `--resolve NAME=ADDR` (host name, IPv4 or IPv6 address) adds FILE's `resolve`, which first boot writes to
    /etc/hosts.

    Example: appliance edge enroll-token --site examples/lab.yaml --profile engineering-laptop --device lt-0042
    -o enroll.json
    """
    from appliance.edge import enrollment

    hosts: dict[str, str] = {}
    for item in resolve or []:
        name, sep, address = item.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise BadInput(f"--resolve {item!r}: expected NAME=ADDR, e.g. gateway.lab.membria=10.0.0.5")
        if name.strip() in hosts:
            raise BadInput(f"--resolve names {name.strip()!r} twice")
        hosts[name.strip()] = address.strip()
    site = load(site_file)
    if revoke:
        if hosts:
            raise BadInput("--resolve goes with minting a token, not with --revoke")
        live = enrollment.revoke(site, device=device, state_dir=state_dir)
        print_ok(f"enrollment token of {device} revoked" if live else f"the token of {device} had already lapsed")
        return
    if profile is None or out is None:
        raise BadInput("--profile and -o are required to mint a token (or pass --revoke)")
    minted = enrollment.mint(site, profile=profile, device=device, out=out, ttl=ttl, state_dir=state_dir, resolve=hosts)
    print_ok(
        f"enrollment token for {minted.device} written to {minted.path} (0600); expires {minted.expires_at}; "
        f"policy {minted.policy}, role {minted.role}"
    )
    if minted.resolve:
        print_ok("resolve (first boot's /etc/hosts): " + ", ".join(f"{n} {a}" for n, a in minted.resolve.items()))


def recovery_key(
    site_file: Path = typer.Option(..., "--site", help="Site file (its Vault)."),
    device: str = typer.Option(..., "--device", help="The laptop's name."),
    state_dir: Path | None = StateDirOption,
) -> None:
    """Print DEVICE's escrowed LUKS recovery key (the latest version); exit 1 if none was escrowed."""
    from appliance.edge import enrollment

    record = enrollment.recovery_key(load(site_file), device=device, state_dir=state_dir)
    # The key itself goes to stdout alone (pipe-friendly); where it came from, to stderr.
    print(record["recovery_key"])
    print(
        f"device {device}: LUKS {record.get('luks_uuid', '?')}, image {record.get('image_id', '?')}, "
        f"escrowed {record.get('enrolled_at', '?')} (version {record['version']})",
        file=sys.stderr,
    )


def wipe(
    site_file: Path = typer.Option(..., "--site", help="Site file (its Vault and PKI)."),
    device: str = typer.Option(..., "--device", help="The laptop's name (its certificate is DEVICE.<domain>)."),
    reason: str | None = typer.Option(None, "--reason", help="Why (stored with the command and audited)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be done; change nothing."),
    cancel: bool = typer.Option(False, "--cancel", help="Take DEVICE off the wipe list instead."),
    state_dir: Path | None = StateDirOption,
) -> None:
    """Order a laptop to destroy its disk keys: put DEVICE on the wipe list (Vault KV membria/edge/wipe-list,
    check-and-set) and revoke its certificates and any outstanding enrollment token.

    The laptop's guard polls the gateway every minute with its device certificate; for a device on the wipe
    list the gateway answers even though that certificate is revoked (there only). The guard acks, erases
    every LUKS keyslot (cryptsetup luksErase) and powers off: after that not even the escrowed recovery key
    opens the disk. Running it again changes nothing (the first command id is kept); `--cancel` takes the
    device off the list before it has picked the command up (its certificates stay revoked). Asks before
    acting unless --yes (and refuses to guess when no one can answer).

    Example: appliance edge wipe --site examples/lab.yaml --device lt-0042 --reason "stolen 2026-11-20"
    """
    from appliance.edge import wipe as wiper

    site = load(site_file)
    if cancel:
        if reason is not None:
            raise BadInput("--reason goes with a wipe, not with --cancel")
        with console.status(f"reading the wipe list for {device}"):
            removed = wiper.cancel(site, device=device, dry_run=dry_run, state_dir=state_dir)
        if removed is None:
            print_ok(f"{device} is not on the wipe list: nothing to cancel")
        elif dry_run:
            print_ok(f"dry run: would take {device} off the wipe list (command {removed.get('id')})")
        else:
            print_ok(
                f"{device} taken off the wipe list (command {removed.get('id')}); its certificates stay revoked: "
                "enroll it again with a fresh token. A laptop that already acked (see the audit log) is wiped."
            )
        return
    if reason is None:
        raise BadInput("--reason is required: say why the laptop is wiped")
    with console.status(f"looking up {device} in Vault (wipe list, certificates, enrollment token)"):
        wanted = wiper.plan(site, device=device, reason=reason, state_dir=state_dir)
    table = Table(title=f"wipe {wanted.device} ({wanted.common_name})")
    table.add_column("what")
    table.add_column("now")
    table.add_column("action", overflow="fold")
    if wanted.listed is None:
        table.add_row("wipe list", "not listed", f"add, reason: {escape(wanted.reason)}")
    else:
        listed = wanted.listed
        table.add_row(
            "wipe list",
            f"listed since {escape(str(listed.get('requested_at', '?')))}",
            f"keep command {escape(str(listed.get('id', '?')))} ({escape(str(listed.get('reason', '')))})",
        )
    for cert in wanted.certificates:
        state = "revoked" if cert.revoked else ("expired" if not cert.live else "valid")
        table.add_row(f"certificate {cert.serial}", state, "revoke" if cert.live else "-")
    if not wanted.certificates:
        table.add_row("certificates", "none issued", "- (the laptop has not enrolled: it cannot poll)")
    token = wanted.token_accessor is not None
    table.add_row("enrollment token", "outstanding" if token else "none", "revoke" if token else "-")
    console.print(table)
    if wanted.nothing_to_do:
        print_ok(f"{device} is already on the wipe list and revoked: nothing to do")
        if dry_run:
            return
    if dry_run:
        print_ok("dry run: nothing changed")
        return
    if not yes and not wanted.nothing_to_do:
        if not sys.stdin.isatty():
            raise BadInput("refusing to wipe a laptop without confirmation", hint="pass --yes")
        typer.confirm(f"Wipe {device}? Its disk becomes unreadable, recovery key included.", abort=True)
    with console.status(f"listing {device} and revoking its certificates"):
        done = wiper.request(site, wanted, state_dir=state_dir)
    entry = done.entry
    if done.added:
        print_ok(f"{device} is on the wipe list (command {entry['id']}, version {done.list_version})")
    else:
        print_ok(f"{device} was already on the wipe list since {entry.get('requested_at')} (command {entry['id']})")
    if done.revoked:
        print_ok(f"revoked certificate(s): {', '.join(done.revoked)}")
    if done.token_revoked:
        print_ok("the outstanding enrollment token is revoked")
    for path in done.rendered:
        console.print(f"  [dim]lab: rendered {escape(str(path))} for the gateway[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(keygen)
    app.command()(build)
    app.command()(verify)
    app.command()(flash)
    app.command("enroll-token")(enroll_token)
    app.command("recovery-key")(recovery_key)
    app.command("wipe")(wipe)
