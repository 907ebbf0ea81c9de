"""The edge image recipe: rootfs, chroot deploy, disk layout, first-boot units, verify, flash."""
