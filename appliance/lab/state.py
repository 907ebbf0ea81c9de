"""The lab's state directory: one place for logs, pid files, data and the lab's own secrets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabState:
    root: Path

    @classmethod
    def at(cls, path: Path) -> LabState:
        state = cls(Path(path).expanduser().resolve())
        state.prepare()
        return state

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def secrets_dir(self) -> Path:
        """Credentials of the embedded services themselves (the dev root token); 0700, files 0600."""
        return self.root / "secrets"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    def prepare(self) -> None:
        for directory in (self.root, self.log_dir, self.run_dir, self.data_dir, self.pki_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
