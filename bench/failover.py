"""Failover: how long live tasks go without a stored record when the node
that owns them dies, and whether any stored record is lost.

Two real nodes on a real PostgreSQL (tests/pg_server.py, Debian's
postgresql-15), nginx-rtmp publishers on loopback, `--tasks` live tasks;
live media in a SeaweedFS bucket (`--s3`, each node its own data dir) or in
one data dir the nodes share.
Each trial SIGKILLs the node that owns the tasks (all of them, after the
first trial) and times, per moved task, the kill to the next stored record
(polled through the surviving node every 50 ms); the killed node is then
started again and the next trial kills the other one. Lost = records stored
before a kill that are gone after it, plus any hole in segment_index or the
timeline. Baseline, from the same run: the interval between consecutive
records while nothing fails (one segment).

Target (CONTRACT §7 and issue 14): 0 lost; max <= 2 x lease + one segment.

    python bench/failover.py [--trials 10] [--tasks 4] [--lease 3] [--segment 2] [--s3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import cluster as cl_mod  # noqa: E402
from cluster import Cluster, tiling_problems  # noqa: E402
from live_servers import RtmpServer, make_test_video, publishing  # noqa: E402
from pg_server import PostgresServer  # noqa: E402


def seqs(records: list[dict]) -> list[int]:
    return [r["data"]["data"]["segment_index"] for r in records if r["data"]["data"] is not None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--lease", type=float, default=3.0)
    ap.add_argument("--segment", type=int, default=2)
    ap.add_argument("--s3", action="store_true", help="live media in a SeaweedFS bucket (tests/s3_server.py)")
    args = ap.parse_args()
    cl_mod.SEG = args.segment

    from streamguard.inference.testmodel import make_test_bundle

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sg-failover-")))
        bundle = tmp / "bundle"
        make_test_bundle(bundle)
        video = make_test_video(tmp / "v.mp4", seconds=10, fps=25, width=160, height=120, red_ranges=())
        pg = stack.enter_context(PostgresServer())
        rtmp = stack.enter_context(RtmpServer())
        urls = [stack.enter_context(publishing(video, rtmp, f"failover{i}"))[1] for i in range(args.tasks)]
        s3 = None
        if args.s3:
            from s3_server import SeaweedS3
            s3 = SeaweedS3(tmp / "weed").up()
            stack.callback(s3.down)
        cl = stack.enter_context(Cluster(tmp / "nodes", bundle, pg.new_database(), s3=s3, lease=args.lease,
                                         max_tasks=args.tasks))
        first = cl.nodes["node-1"]
        key = first.create_key("bench")
        tasks = [cl_mod.start_task(first, key, url) for url in urls]
        cl.wait_for(lambda: all(len(cl.records(t, key)) >= 3 for t in tasks), 60, "three records per task")

        # baseline: the record interval while nothing fails
        t0, n0 = time.monotonic(), sum(len(cl.records(t, key)) for t in tasks)
        time.sleep(4 * args.segment)
        baseline = (time.monotonic() - t0) / max(1, (sum(len(cl.records(t, key)) for t in tasks) - n0) / len(tasks))

        gaps: list[float] = []
        lost = 0
        for trial in range(1, args.trials + 1):
            owners = {t: cl.view(t, key)["node"] for t in tasks}
            victim = max(cl.nodes, key=lambda n: sum(1 for o in owners.values() if o == n))
            survivor = cl.alive(but=victim)
            moved = [t for t, o in owners.items() if o == victim]
            before = {t: seqs(cl.records(t, key, survivor)) for t in moved}
            killed_at = cl.kill(victim)
            pending = set(moved)
            times: dict[str, float] = {}
            while pending and time.monotonic() - killed_at < 60:
                for t in list(pending):
                    if len(seqs(cl.records(t, key, survivor))) > len(before[t]):
                        times[t] = time.monotonic() - killed_at
                        pending.discard(t)
                time.sleep(0.05)
            for t in moved:
                after = seqs(cl.records(t, key, survivor))
                lost += len(set(before[t]) - set(after))
            gaps += times.values()
            print(f"trial {trial:2d}: killed {victim} ({len(moved)} task(s)): kill -> next stored record "
                  + ", ".join(f"{v:.2f}" for v in sorted(times.values()))
                  + (f"; {len(pending)} task(s) got none within 60 s" if pending else ""), flush=True)
            lost += len(pending)
            cl.restart(victim)

        for t in tasks:
            cl.alive().call("POST", f"/v1/streams/{t}/stop", key=key)
        for t in tasks:
            lost += len(tiling_problems(cl.records(t, key)))

    bound = 2 * args.lease + args.segment
    p50, worst = statistics.median(gaps), max(gaps)
    print(f"\n{len(gaps)} takeovers over {args.trials} trials, lease {args.lease:g} s, segment {args.segment} s, "
          f"media {'in S3 (SeaweedFS)' if args.s3 else 'in one shared data dir'}")
    print(f"kill -> next stored record: p50 {p50:.2f} s, max {worst:.2f} s "
          f"(bound 2 x lease + segment = {bound:g} s: {'met' if worst <= bound else 'NOT met'})")
    print(f"baseline record interval {baseline:.2f} s; p50 / baseline = {p50 / baseline:.2f}, "
          f"max / baseline = {worst / baseline:.2f}")
    print(f"stored records lost: {lost}")
    return 0 if lost == 0 and worst <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
