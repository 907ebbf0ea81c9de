"""Revoked client certificates, from the PKI's CRL file, re-read whenever the file changes.

Checked per request rather than in the TLS context: a context's CRL cannot be swapped while uvicorn
serves, and a revocation must take effect without a restart.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cryptography import x509


class RevocationList:
    def __init__(self, crl_file: Path | None) -> None:
        self.crl_file = crl_file
        self._serials: frozenset[str] = frozenset()
        self._mtime_ns: int | None = None
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        if self.crl_file is None:
            return
        try:
            mtime = self.crl_file.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime_ns:
            return
        with self._lock:
            crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
            self._serials = frozenset(format(r.serial_number, "x") for r in crl)
            self._mtime_ns = mtime

    def is_revoked(self, serial_hex: str | None) -> bool:
        if serial_hex is None:
            return False
        self._refresh()
        return serial_hex in self._serials
