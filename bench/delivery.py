"""Delivery throughput and latency of the outbox.

A fast local receiver (aiohttp, its own process, answers 204) and 50 live-like
tasks whose records go through the real path: stored with their outbox rows
in one transaction, sent by the delivery worker with Standard Webhooks
signatures, acknowledged, marked delivered.

1. burst: 20,000 records wait in the outbox (as after a receiver outage);
   prints the records/s the worker sustains draining them, in order per task;
2. steady: each of the 50 tasks stores one record per second (a busy node
   with 1 s segments); prints p50/p95/max stored->acknowledged latency.

    python bench/delivery.py [--tasks 50] [--seconds 20] [--burst 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamguard.config import DeliverySettings
from streamguard.delivery.worker import DeliveryWorker
from streamguard.metrics import Metrics
from streamguard.store import AsyncStore, Store
from streamguard.store.sqlite import TaskRow, new_id
from streamguard.services.streams import segment_event, store_record, store_task

RECEIVER = """
import sys
from aiohttp import web
async def hook(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post('/hook/{task}', hook)
web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(task_id: str, seq: int) -> bytes:
    return (b'{"code":"200","message":"SUCCESS","task_id":"%s","data":{"status":0,"message":"segment processed",'
            b'"data":{"segment_index":%d,"start_time":"0.000","end_time":"1.000","video_url":"x",'
            b'"content_moderation":null,"logo_detection":null,"categorization":null,"processing_time_ms":"3"},'
            b'"token":{"input":50,"output":0,"total":50,"video_tokens":50,"text_tokens":0}}}'
            % (task_id.encode(), seq))


async def wait_delivered(store: AsyncStore, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending, _ = await store(Store.outbox_stats)
        if pending == 0:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("deliveries did not finish")


def latencies(db: Path, since: float) -> list[float]:
    import sqlite3
    con = sqlite3.connect(db)
    rows = con.execute("SELECT delivered_at - created_at FROM deliveries WHERE status='delivered' AND created_at >= ? "
                       "AND event = 'stream.segment'", (since,)).fetchall()
    con.close()
    return sorted(r[0] for r in rows)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sg-delivery-bench-"))
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        await asyncio.sleep(1.0)
        store = AsyncStore(Store(tmp / "sg.db"))
        key, info = store.sync.create_key("bench")
        settings = DeliverySettings(allow_private=True, max_in_flight=64)
        worker = DeliveryWorker(store, settings, Metrics())
        rows = []
        for i in range(args.tasks):
            row = TaskRow(id=new_id("tsk"), project_id=info.project_id, key_id=info.id, kind="stream", url="rtmp://x",
                          params={"callback_url": f"http://127.0.0.1:{port}/hook/{i}"}, state="running",
                          created_at=time.time())
            await store(store_task, row, [])
            rows.append(row)

        # 1. burst: the outbox holds a backlog (a receiver was down); how fast does it drain?
        per_task = args.burst // args.tasks
        for k in range(per_task):
            for row in rows:
                body = record(row.id, k)
                await store(store_record, row, k, 0, body, [segment_event(body)])
        t0 = time.monotonic()
        worker.start()
        await wait_delivered(store)
        drain = time.monotonic() - t0
        n = per_task * args.tasks
        print(f"burst: {n} records queued for {args.tasks} tasks, drained in {drain:.1f} s: "
              f"{n / drain:.0f} records/s sustained to the receiver, in order per task")

        # 2. steady load: 1 record per task per second, stored -> acknowledged latency
        since = time.time()
        seq = per_task
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            tick = time.monotonic()
            for row in rows:
                body = record(row.id, seq)
                await store(store_record, row, seq, 0, body, [segment_event(body)])
            worker.wake()
            seq += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        await wait_delivered(store)
        steady = latencies(tmp / "sg.db", since)
        print(f"steady: {args.tasks} tasks x 1 record/s for {args.seconds:.0f} s = {len(steady)} records; "
              f"stored->acknowledged p50 {1000 * pct(steady, 0.5):.1f} ms, p95 {1000 * pct(steady, 0.95):.1f} ms, "
              f"max {1000 * steady[-1]:.1f} ms")
        await worker.close()
        store.close()
    finally:
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--burst", type=int, default=20000)
    try:
        import uvloop
        uvloop.run(main(ap.parse_args()))
    except ImportError:
        asyncio.run(main(ap.parse_args()))
    os._exit(0)
