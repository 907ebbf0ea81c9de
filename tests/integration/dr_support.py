"""Support for DR tests: a real moto S3 server on a free port and DR buckets on it.

`S3Endpoint.start()` runs `python -m moto.server` (not moto's in-process mock): requests cross a real
socket, so an endpoint that goes down can be stopped and started again.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config

from appliance.backends import S3Target
from appliance.dr.crypto import DataKey
from appliance.dr.objects import DrBucket
from appliance.lab.bootstrap import ensure_locked_bucket
from appliance.site import Dr
from tests.conftest import free_port


@dataclass
class S3Endpoint:
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start_new(cls, log_dir: Path) -> S3Endpoint:
        endpoint = cls(free_port(), log_dir / f"moto-{uuid.uuid4().hex[:6]}.log")
        endpoint.start()
        return endpoint

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return
            except botocore.exceptions.BotoCoreError:
                time.sleep(0.2)
        raise RuntimeError(f"moto server on {self.port} did not start; see {self.log}")

    def stop(self) -> None:
        """Stop the server (its data is gone: moto keeps it in memory)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self, access_key: str = "test", secret_key: str = "test") -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=30),
        )

    def target(self, bucket: str) -> S3Target:
        target = S3Target(client=self.client(), bucket=bucket, endpoint=self.url)
        ensure_locked_bucket(target)
        return target


def dr_bucket(
    primary: S3Endpoint, replica: S3Endpoint | None = None, *, key: DataKey | None = None, site: str = "test"
) -> DrBucket:
    """A DrBucket on fresh locked buckets (the replica on its own endpoint when given)."""
    name = f"dr-{uuid.uuid4().hex[:10]}"
    return DrBucket(
        primary.target(name),
        replica.target(name + "-r") if replica is not None else None,
        key or DataKey.generate(),
        Dr(),
        site_name=site,
    )
