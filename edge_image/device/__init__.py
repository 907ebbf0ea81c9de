"""What runs on the laptop itself (first boot, guard, wipe, selftest), from the image's venv.

Each module that needs systemd units exposes `UNITS: dict[str, str]` (unit file name -> content, installed under
/etc/systemd/system by the image's deploy) and `ENABLED: tuple[str, ...]` (the units the deploy enables). Imports
stay within the laptop's wheelhouse (stdlib, httpx, cryptography, pydantic): the control plane's packages are not
on the laptop.
"""
