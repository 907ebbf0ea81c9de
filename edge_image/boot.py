"""The boot chain inside the root tree: dracut's configuration, the generic initrd, and the ESP's boot files.

systemd-boot on the ESP loads the kernel and a dracut initrd in which systemd-cryptsetup opens the LUKS2 root with
its `systemd-tpm2` token (see DESIGN.md, "Boot chain and TPM unlock"). The initrd is generic (`hostonly="no"`): it
is built on the build machine and must boot any laptop, so it carries every storage driver. The known trap is an
initrd that looks fine and silently falls back to the passphrase prompt because libcryptsetup's token plugin or the
tpm2-tss libraries it loads at run time (dlopen: invisible to dracut's dependency scan) are missing (dracut #1676),
so every initrd is listed with `lsinitrd` and refused unless all of it is there.

The same configuration stays in the image, so a kernel upgrade on the laptop (the Debian kernel hooks: dracut, then
`kernel-install add`) makes the same kind of initrd and puts it where the build put its own: /efi/membria/<kver>/,
with the entry loader/entries/membria-<kver>.conf.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from edge_image import esp
from edge_image.chroot import run_in
from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError
from edge_image.rootfs import kernel_version

# libcryptsetup's external token handler for `systemd-tpm2` tokens; in bookworm the `systemd` package ships it.
TOKEN_PLUGIN = "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so"  # noqa: S105 - a path
# What systemd 252's TPM2 code dlopens (libsystemd-shared names exactly these sonames), the TCTI for /dev/tpmrm0 last.
TSS2_LIBRARIES = tuple(
    f"/usr/lib/x86_64-linux-gnu/{name}"
    for name in ("libtss2-esys.so.0", "libtss2-rc.so.0", "libtss2-mu.so.0", "libtss2-tcti-device.so.0")
)
ENTRY_TOKEN = "membria"  # noqa: S105 - kernel-install's entry token: a name
SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
DRACUT_CONF = "etc/dracut.conf.d/10-membria.conf"

# dracut modules: systemd (the initrd runs systemd, so systemd-cryptsetup, not dracut's shell crypt scripts, opens
# the disk), crypt (installs systemd-cryptsetup and its generator when systemd is in), dm (dm-crypt's device mapper),
# tpm2-tss (the tpm2-tss libraries, the TPM drivers, the tss user and udev rule; its check() returns 255, so it is only
# included when asked for).
DRACUT_MODULES = ("systemd", "crypt", "dm", "tpm2-tss")
# TPM (CRB on recent laptops, TIS on older ones and swtpm's tpm-tis), the laptops' and the boot test's storage, USB
# for a recovery stick, the cipher (aes-xts-plain64 needs xts) and the root filesystem.
DRIVERS = (
    "tpm_crb", "tpm_tis", "nvme", "virtio_blk", "virtio_pci", "ahci", "sd_mod", "usb_storage", "xhci_pci",
    "dm_crypt", "xts", "ext4",
)  # fmt: skip
# Kernel modules an initrd must have (as a module in it or built into the kernel) to open the root.
REQUIRED_KMODS = ("tpm_crb", "tpm_tis", "dm_crypt", "xts", "ext4", "nvme", "ahci", "sd_mod", "virtio_blk")
REQUIRED_FILES = (
    "usr/lib/systemd/systemd-cryptsetup",  # crypt: opens the root, from the command line's rd.luks.* via its generator
    "usr/lib/systemd/system-generators/systemd-cryptsetup-generator",
    "usr/lib/udev/rules.d/95-dm-notify.rules",  # dm: without it libdevmapper waits for udev forever
    "usr/lib/udev/rules.d/60-tpm-udev.rules",  # tpm2-tss: the module's own rule (/dev/tpmrm0 for the tss group)
    TOKEN_PLUGIN.lstrip("/"),
    *(lib.lstrip("/") for lib in TSS2_LIBRARIES),
)

_KO = re.compile(r"\.ko(?:\.(?:xz|zst|gz))?$")
# One `ls -l` line of lsinitrd: type and mode, links, owner, group, size (or major, minor), date, then the path.
_LISTING = re.compile(r"^[-dlcbps][-rwxsStT]{9}\s+\d+\s+\S+\s+\S+\s+(?:\d+,\s*)?\d+\s+\S+\s+\d+\s+\S+\s+(.+)$")


def dracut_conf() -> str:
    lines = [
        "# membria edge image: one generic initrd that opens the LUKS2 root with its systemd-tpm2 token",
        "# (edge_image/boot.py writes this; the build and the laptop's kernel upgrades use it alike)",
        'hostonly="no"',
        'hostonly_cmdline="no"',
        f'add_dracutmodules+=" {" ".join(DRACUT_MODULES)} "',
        f'add_drivers+=" {" ".join(DRIVERS)} "',
        "# dlopened at unlock time, so dracut's ldd-based scan never sees them (dracut #1676): named here",
        f'install_items+=" {" ".join((TOKEN_PLUGIN, *TSS2_LIBRARIES))} "',
        'compress="zstd"',
    ]
    return "\n".join(lines) + "\n"


def configure(tree: Path, *, luks_uuid: str, tpm2_pcrs: list[int]) -> None:
    """Write dracut's drop-in and kernel-install's settings into the tree (no chroot needed).

    tpm2_pcrs is not part of the boot files (systemd-cryptenroll seals to it at first boot); it is checked here so
    a wrong list fails the build, not the laptop.
    """
    if not tpm2_pcrs or any(not 0 <= pcr <= 23 for pcr in tpm2_pcrs):
        raise ImageBadInput(f"TPM2 PCRs must be 0..23, not {tpm2_pcrs}")
    options = esp.kernel_options(luks_uuid, first_boot=False)
    (tree / DRACUT_CONF).parent.mkdir(parents=True, exist_ok=True)
    (tree / DRACUT_CONF).write_text(dracut_conf())
    kernel = tree / "etc" / "kernel"
    kernel.mkdir(parents=True, exist_ok=True)
    # No /etc/crypttab: the root is named on the kernel command line (rd.luks.name=, rd.luks.options=), which the
    # initrd's systemd-cryptsetup-generator reads; a crypttab would be a second source that can disagree with it.
    (kernel / "cmdline").write_text(options + "\n")
    (kernel / "entry-token").write_text(ENTRY_TOKEN + "\n")
    # Sourced by kernel-install: BLS layout under /efi/membria/<kver>/, entries named membria-<kver>.conf.
    (kernel / "install.conf").write_text("layout=bls\ninitrd_generator=dracut\nBOOT_ROOT=/efi\n")


def make_boot_files(tree: Path, esp_tree: Path) -> tuple[str, str, str]:
    """Build the initrd in the prepared tree and copy the boot files into esp_tree.

    Returns the kernel's and the initrd's paths relative to esp_tree, and the kernel version (BuildSpec's
    kernel, initrd and kernel_version). The caller holds `chroot.prepared(tree)` open.
    """
    kver = kernel_version(tree)
    vmlinuz = tree / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise ImageError(f"{vmlinuz}: missing (linux-image-{kver} is not fully installed)")
    efi = tree / SYSTEMD_BOOT
    if not efi.is_file():
        raise ImageError(f"{efi}: missing (is systemd-boot installed in the tree?)")
    if not (tree / DRACUT_CONF).is_file():
        raise ImageError(f"{tree / DRACUT_CONF}: missing (boot.configure writes it first)")
    # dracut itself, not `kernel-install add`: in a chroot /efi is no mount point, so 90-loaderentry.install would
    # write entries whose paths start with /efi/, and it would read the initrd from /boot/initrd.img-<kver>. The
    # build writes the entries itself (build.write_boot_files); on the laptop kernel-install does, from the same
    # configuration.
    inside = f"/tmp/membria-initrd-{kver}"  # noqa: S108 - the chroot's own tmpfs (chroot.prepared)
    run_in(
        tree,
        ["dracut", "--quiet", "--force", "--no-hostonly", "--reproducible", "--kver", kver, inside],
        what=f"building the initrd for {kver} with dracut",
        env={"SOURCE_DATE_EPOCH": str(int(vmlinuz.stat().st_mtime))},
    )
    built = tree / inside.lstrip("/")
    try:
        problems = check_initrd(tree, built)
        if problems:
            raise ImageCheckFailed(
                f"the initrd dracut made cannot unlock the root with the TPM: {'; '.join(problems)}",
                hint=f"check {tree / DRACUT_CONF} and the packages (systemd, tpm2-tools, libtss2-*) in the image",
            )
        target = esp_tree / ENTRY_TOKEN / kver
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vmlinuz, target / "linux")
        shutil.copyfile(built, target / "initrd")
    finally:
        built.unlink(missing_ok=True)
    for name in ("EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi"):
        (esp_tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(efi, esp_tree / name)
    # rootfs.py keeps the kernel's postinst from making one; a tree from elsewhere may still hold it. It is not what
    # boots (the ESP's initrd is) and is as big as that one.
    for stale in (tree / "boot").glob("initrd.img-*"):
        stale.unlink()
    return f"{ENTRY_TOKEN}/{kver}/linux", f"{ENTRY_TOKEN}/{kver}/initrd", kver


def _listing(tree: Path, initrd: Path) -> str:
    """lsinitrd's output for an initrd anywhere on this machine (run in the tree: its dracut reads the format)."""
    tree = tree.resolve()
    initrd = initrd.resolve()
    if not initrd.is_file():
        raise ImageBadInput(f"{initrd}: no such initrd")
    if initrd.is_relative_to(tree):
        return run_in(
            tree, ["lsinitrd", "/" + initrd.relative_to(tree).as_posix()], what="listing the initrd"
        ).stdout.decode(errors="replace")
    with tempfile.TemporaryDirectory(dir=tree / "tmp", prefix="membria-lsinitrd-") as scratch:
        copy = Path(scratch) / "initrd"
        shutil.copyfile(initrd, copy)
        return run_in(
            tree, ["lsinitrd", "/" + copy.relative_to(tree).as_posix()], what=f"listing the initrd {initrd}"
        ).stdout.decode(errors="replace")


def _normalise(path: str) -> str:
    # The initrd's /lib, /bin, /sbin, /lib64 are symlinks into /usr (merged /usr), so either spelling is the same file.
    head, _, rest = path.partition("/")
    return f"usr/{path}" if head in ("lib", "lib64", "bin", "sbin") and rest else path


def parse_listing(text: str) -> tuple[list[str], set[str]]:
    """lsinitrd's output -> (dracut modules, paths in the archive)."""
    modules: list[str] = []
    paths: set[str] = set()
    in_modules = False
    for line in text.splitlines():
        if line.startswith("dracut modules:"):
            in_modules = True
            continue
        if in_modules:
            if line.startswith("====") or not line.strip():
                in_modules = False
            else:
                modules.append(line.strip())
            continue
        match = _LISTING.match(line)
        if match:
            path = match.group(1).split(" -> ", 1)[0]
            paths.add(_normalise(path))
    return modules, paths


def _kmod_name(path: str) -> str:
    return _KO.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


def check_initrd(tree: Path, initrd: Path) -> list[str]:
    """What the initrd lacks for a TPM2 unlock of the root: an empty list means nothing.

    initrd may be inside the tree or anywhere else; the listing comes from the tree's own lsinitrd.
    """
    modules, paths = parse_listing(_listing(tree, initrd))
    problems = [f"dracut module {name} not included" for name in DRACUT_MODULES if name not in modules]
    problems += [f"/{path} missing" for path in REQUIRED_FILES if path not in paths]
    kvers = sorted({p.split("/")[3] for p in paths if p.startswith("usr/lib/modules/") and p.count("/") >= 4})
    kver = kvers[0] if len(kvers) == 1 else kernel_version(tree)
    in_initrd = {_kmod_name(p) for p in paths if p.startswith(f"usr/lib/modules/{kver}/") and _KO.search(p)}
    builtin_file = tree / "usr" / "lib" / "modules" / kver / "modules.builtin"
    builtin = {_kmod_name(line) for line in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    problems += [
        f"kernel module {name} missing (neither in the initrd nor built into {kver})"
        for name in REQUIRED_KMODS
        if name not in in_initrd and name not in builtin
    ]
    return problems
