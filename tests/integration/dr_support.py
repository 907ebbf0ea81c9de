"""Support for DR tests: a real moto S3 server on a free port and DR buckets on it.

`S3Endpoint.start()` runs `python -m moto.server` (not moto's in-process mock): requests cross a real
socket, so an endpoint that goes down can be stopped and started again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from appliance.backends import S3Target
from appliance.dr.crypto import DataKey
from appliance.dr.objects import DrBucket
from appliance.hosts.relay import TcpRelay
from appliance.lab.bootstrap import ensure_locked_bucket
from appliance.site import Dr
from tests.conftest import free_port


@dataclass
class S3Endpoint:
    port: int
    log: Path
    auth: bool = False  # True: moto checks signatures against IAM users (the keys below)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    access_key: str = "test"
    secret_key: str = field(default="test", repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start_new(cls, log_dir: Path, *, auth: bool = False) -> S3Endpoint:
        endpoint = cls(free_port(), log_dir / f"moto-{uuid.uuid4().hex[:6]}.log", auth=auth)
        endpoint.start()
        return endpoint

    def start(self) -> None:
        env = dict(os.environ)
        if self.auth:
            # moto lets the first requests through unsigned: enough to create the one IAM user below.
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"moto server on {self.port} did not start; see {self.log}")
        if self.auth:
            iam = boto3.client(
                "iam", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
            )
            iam.create_user(UserName="membria-dr")
            key = iam.create_access_key(UserName="membria-dr")["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName="membria-dr", PolicyName="s3", PolicyDocument=json.dumps(policy))
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        """Stop the server (its data is gone: moto keeps it in memory)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=30),
        )

    def target(self, bucket: str) -> S3Target:
        target = S3Target(client=self.client(), bucket=bucket, endpoint=self.url)
        ensure_locked_bucket(target)
        return target


@contextlib.contextmanager
def endpoint_pair(log_dir: Path, *, auth: bool = False) -> Iterator[tuple[S3Endpoint, S3Endpoint]]:
    """A primary (with IAM auth when asked) and a replica endpoint, stopped on exit."""
    primary, replica = S3Endpoint.start_new(log_dir, auth=auth), S3Endpoint.start_new(log_dir)
    try:
        yield primary, replica
    finally:
        primary.stop()
        replica.stop()


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


class Outage(TcpRelay):
    """A relay in front of an endpoint that can be cut and restored: clients see connection refused while
    it is cut (`down()`), as when the S3 endpoint or the network to it is down, while the server behind
    (moto keeps its data in memory) keeps everything it already has; `up()` listens on the same port again."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", upstream_port))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
