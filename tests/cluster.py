"""Several real `streamguard serve` nodes on one real PostgreSQL
(tests/pg_server.py), for the cluster test and bench/failover.py.

Media: with `s3` (a SeaweedS3 from tests/s3_server.py) every node has its own
data dir and publishes live media to the one bucket (storage.media = "s3"),
as nodes on different machines do; without, the nodes share one data dir on
this machine, so one media dir. Each node has its own id, port and log."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from daemon import Daemon, wait_for

LEASE = 3.0  # cluster.lease_seconds in these tests: takeovers within 2 x 3 s
SEG = 2      # segment_seconds


def node_env(database_url: str, node: str, *, lease: float = LEASE, max_tasks: int = 6) -> dict[str, str]:
    return {
        "STREAMGUARD_STORAGE__DATABASE_URL": database_url,
        "STREAMGUARD_CLUSTER__NODE_ID": node,
        "STREAMGUARD_CLUSTER__LEASE_SECONDS": str(lease),
        "STREAMGUARD_LIMITS__MAX_TASKS": str(max_tasks),
        "STREAMGUARD_STORAGE__MIN_FREE_BYTES": "0",
        "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true",
        "STREAMGUARD_DELIVERY__TIMEOUT": "2",  # a dead sender's claim runs out after this + 10 s
        "STREAMGUARD_DELIVERY__RETRY_BASE_SECONDS": "0.5",
        "STREAMGUARD_DELIVERY__RETRY_MAX_SECONDS": "2",
        "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "30",
    }


def s3_env(s3: Any, prefix: str = "live/") -> dict[str, str]:
    """Live media in the SeaweedFS bucket, and one secret-sealing key for every node."""
    from cryptography.fernet import Fernet
    from s3_server import ACCESS_KEY, BUCKET, SECRET_KEY
    return {"STREAMGUARD_STORAGE__MEDIA": "s3", "STREAMGUARD_STORAGE__S3__ENDPOINT": s3.endpoint,
            "STREAMGUARD_STORAGE__S3__BUCKET": BUCKET, "STREAMGUARD_STORAGE__S3__PREFIX": prefix,
            "STREAMGUARD_STORAGE__S3__ACCESS_KEY": ACCESS_KEY, "STREAMGUARD_STORAGE__S3__SECRET_KEY": SECRET_KEY,
            "STREAMGUARD_SECURITY__SECRET_KEY": Fernet.generate_key().decode()}


class Cluster:
    def __init__(self, root: Path, bundle: Path, database_url: str, names: tuple[str, ...] = ("node-1", "node-2"),
                 *, s3: Any = None, **env: Any) -> None:
        self.root = Path(root)
        self.url = database_url
        shared = s3_env(s3) if s3 is not None else {}
        self.nodes = {name: Daemon(self.root / name if s3 is not None else self.root, bundle,
                                   {**node_env(database_url, name, **env), **shared}, log_name=f"{name}.log")
                      for name in names}

    def __enter__(self) -> "Cluster":
        self.start(*self.nodes)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, d in self.nodes.items():
            self.cont(name)
            d.kill()

    def start(self, *names: str) -> None:
        """Start nodes at once (each waits for its own /readyz)."""
        errors: list[BaseException] = []

        def one(name: str) -> None:
            try:
                self.nodes[name].start(timeout=60)
            except BaseException as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        if errors:
            raise errors[0]

    def restart(self, name: str) -> Daemon:
        """A new process of the same node (same id), e.g. after a SIGKILL."""
        old = self.nodes[name]
        fresh = Daemon(old.data_dir, old.bundle, old.env, log_name=old.log_path.name)
        fresh.env = old.env
        self.nodes[name] = fresh
        self.start(name)
        return fresh

    def kill(self, name: str) -> float:
        d = self.nodes[name]
        assert d.proc is not None
        t = time.monotonic()
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        return t

    def pause(self, name: str) -> None:
        os.killpg(self.nodes[name].proc.pid, signal.SIGSTOP)

    def cont(self, name: str) -> None:
        d = self.nodes[name]
        if d.proc is not None and d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGCONT)

    def alive(self, but: str | None = None) -> Daemon:
        """A node to ask (any node answers for the whole cluster)."""
        for name, d in self.nodes.items():
            if name != but and d.proc is not None and d.proc.poll() is None:
                return d
        raise AssertionError("no node alive")

    def view(self, task_id: str, key: str, via: Daemon | None = None) -> dict:
        reply = (via or self.alive()).call("GET", f"/v1/streams/{task_id}", key=key)
        assert reply.status == 200, reply.body
        return reply.data

    def records(self, task_id: str, key: str, via: Daemon | None = None) -> list[dict]:
        return (via or self.alive()).records(task_id, key)

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{d.logs()}" for name, d in self.nodes.items())

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.1):
        return wait_for(predicate, timeout, what, self.logs, interval)


def start_task(d: Daemon, key: str, url: str, callback: str | None = None) -> str:
    body = {"url": url, "enable_content_moderation": True, "segment_seconds": SEG}
    if callback:
        body["callback_url"] = callback
    reply = d.call("POST", "/v1/streams", body, key=key)
    assert reply.status == 200, reply.body
    return reply.body["data"]["task_id"]


def tiling_problems(records: list[dict]) -> list[str]:
    """What breaks "next segment_index, continuous timeline" in a task's records (empty: nothing)."""
    problems = []
    indexes = [r["data"]["data"]["segment_index"] for r in records if r["data"]["data"] is not None]
    if indexes != list(range(len(indexes))):
        problems.append(f"segment indexes {indexes}")
    datas = [r["data"]["data"] for r in records if r["data"]["data"] is not None]
    if datas and datas[0]["start_time"] != "0.000":
        problems.append(f"first start {datas[0]['start_time']}")
    for a, b in zip(datas, datas[1:]):
        if a["end_time"] != b["start_time"]:
            problems.append(f"gap/overlap between {a['segment_index']} ({a['end_time']}) and "
                            f"{b['segment_index']} ({b['start_time']})")
    return problems
