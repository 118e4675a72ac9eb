"""Task ownership in the store, on SQLite and on a real PostgreSQL: leases,
epochs (fencing), placement, job claims and delivery claims between nodes.
Each "node" is its own connection to the one database."""

from __future__ import annotations

import threading
import time

import pytest

from streamguard.store.sqlite import Claimant, LeaseLost, OutboxItem, TaskRow

LEASE = 3.0


def claimant(node: str, now: float | None = None) -> Claimant:
    now = time.time() if now is None else now
    return Claimant(node, now, now + LEASE)


@pytest.fixture
def nodes(store_backend):
    a, b = store_backend(), store_backend()
    yield a, b
    a.close()
    b.close()


def live_task(store, key, task_id: str, node: str | None, *, epoch: int = 1, lease_until: float | None = None,
              weight: int = 1, created_at: float | None = None) -> TaskRow:
    row = TaskRow(id=task_id, project_id=key.project_id, key_id=key.id, kind="stream", url="rtmp://x", params={},
                  state="running", created_at=created_at or time.time(), node=node, epoch=epoch,
                  lease_until=time.time() + LEASE if lease_until is None else lease_until, weight=weight)
    store.create_task(row)
    return row


def seqs(store, task_id: str) -> list[int]:
    return [seq for seq, _ in store.records(task_id, -1, 100)]


def test_an_expired_lease_is_taken_over_and_the_old_owners_writes_are_refused(nodes):
    a, b = nodes
    _, key = a.create_key("acme", 1000)
    row = live_task(a, key, "tsk_1", "node-a")
    a.append_record(row.id, key.id, 0, 0, b"{}", cost=10, timeline_end=2.0, epoch=1)
    assert b.claim_tasks(claimant("node-b"), [], None) == []  # a's lease is fresh
    (taken, before), = b.claim_tasks(claimant("node-b", time.time() + LEASE + 1), [], None)  # ... and ran out
    assert (before, taken.node, taken.epoch, taken.next_seq, taken.timeline_end) == ("node-a", "node-b", 2, 1, 2.0)
    with pytest.raises(LeaseLost):  # node a, paused meanwhile, wakes up: refused, nothing stored or charged
        a.append_record(row.id, key.id, 1, 0, b"{}", cost=10, timeline_end=4.0, epoch=1,
                        outbox=[OutboxItem("msg_x", key.project_id, row.id, "http://a.example/", "stream.segment",
                                           b"{}")])
    a.set_task_state(row.id, "stopped", final_status=14, final_message="x", epoch=1)  # fenced: no effect
    assert a.renew_leases("node-a", [row.id], time.time() + LEASE) == {}  # a learns it lost the task
    b.append_record(row.id, key.id, 1, 0, b"{}", cost=10, timeline_end=4.0, epoch=2)
    assert seqs(b, row.id) == [0, 1] and b.balance(key.id) == 980 and b.outbox_stats()[0] == 0
    assert b.task(row.id).state == "running" and b.renew_leases("node-b", [row.id], time.time() + LEASE) == {row.id: 2}


def test_claims_take_own_assigned_and_expired_tasks_within_room(nodes):
    a, b = nodes
    _, key = a.create_key("acme")
    t0 = time.time() - 100
    live_task(a, key, "tsk_own", "node-b", created_at=t0)                     # b's own (b restarted)
    live_task(a, key, "tsk_assigned", "node-b", epoch=0, created_at=t0 + 1)   # placed on b, not claimed yet
    live_task(a, key, "tsk_a", "node-a", created_at=t0 + 2)                   # a's, fresh lease: not b's
    live_task(a, key, "tsk_dead", "node-c", lease_until=time.time() - 1, weight=2, created_at=t0 + 3)
    live_task(a, key, "tsk_running", "node-b", created_at=t0 + 4)             # b runs it: excluded
    claimed = b.claim_tasks(claimant("node-b"), ["tsk_running"], room=2)
    assert [(r.id, before, r.epoch) for r, before in claimed] == [("tsk_own", "node-b", 2),
                                                                   ("tsk_assigned", "node-b", 1)]
    claimed = b.claim_tasks(claimant("node-b"), ["tsk_running", "tsk_own", "tsk_assigned"], room=2)
    assert [(r.id, before) for r, before in claimed] == [("tsk_dead", "node-c")]
    single = Claimant("node-z", time.time(), time.time() + LEASE, any_owner=True)  # one node on SQLite: all its own
    assert {r.id for r, _ in a.claim_tasks(single, [], None)} == {"tsk_own", "tsk_assigned", "tsk_a", "tsk_dead",
                                                                   "tsk_running"}


def test_placement_counts_weights_and_refuses_a_full_node(nodes):
    a, b = nodes
    _, key = a.create_key("acme")
    now = time.time()
    a.heartbeat("node-a", 4, 2, now)
    b.heartbeat("node-b", 4, 2, now)
    a.heartbeat("node-gone", 4, 2, now - 60)
    live_task(a, key, "tsk_1", "node-a", weight=3)
    assert a.free_capacity(now - LEASE) == {"node-a": 1, "node-b": 4}
    row = TaskRow(id="tsk_2", project_id=key.project_id, key_id=key.id, kind="stream", url="rtmp://x", params={},
                  state="starting", created_at=now, node="node-a", weight=2, lease_until=now + LEASE)
    assert not a.assign_task(row, [], now - LEASE) and a.task("tsk_2") is None
    row.node = "node-b"
    assert b.assign_task(row, [], now - LEASE) and b.free_capacity(now - LEASE)["node-b"] == 2


def make_job(store, key, job_id: str) -> None:
    row = TaskRow(id=job_id, project_id=key.project_id, key_id=key.id, kind="job", url="http://x/v.mp4",
                  params={}, state="starting", created_at=time.time())
    store.create_job(row)


def test_a_job_is_claimed_once_and_a_dead_nodes_job_runs_again_elsewhere(nodes):
    a, b = nodes
    _, key = a.create_key("acme")
    make_job(a, key, "job_1")
    none = lambda store, row: []  # noqa: E731 - no events
    got = a.claim_job("job_1", none, claimant("node-a"))
    assert got is not None and got.task.node == "node-a" and got.attempts == 1
    assert b.claim_job("job_1", none, claimant("node-b")) is None  # a holds it
    assert b.runnable_jobs([], 10, claimant("node-b")) == []
    later = claimant("node-b", time.time() + LEASE + 1)  # a died: its lease ran out
    assert [j.id for j in b.runnable_jobs([], 10, later)] == ["job_1"]
    again = b.claim_job("job_1", none, later)
    assert again.attempts == 2 and again.task.epoch == got.task.epoch + 1
    with pytest.raises(LeaseLost):
        a.append_job_record("job_1", key.id, 0, 0, b"{}", cost=0, video_tokens=0, text_tokens=0, flagged=False,
                            timeline_end=1.0, progress=0.5, outbox=[], epoch=got.task.epoch)
    with pytest.raises(LeaseLost):
        a.finish_job("job_1", "COMPLETED", none, epoch=got.task.epoch)
    assert b.finish_job("job_1", "COMPLETED", none, epoch=again.task.epoch).status == "COMPLETED"


def test_one_sender_per_stream_across_nodes_and_a_lapsed_claim_is_sent_again(nodes):
    a, b = nodes
    _, key = a.create_key("acme")
    a.enqueue([OutboxItem(f"msg_{i}", key.project_id, "tsk_1", "http://r.example/", "stream.segment", b"{}")
               for i in range(2)])
    now = time.time()
    (head,) = a.due_deliveries(now, 10, set(), ("node-a:1", now + 10))
    assert head.event_id == "msg_0"
    assert b.due_deliveries(now, 10, set(), ("node-b:1", now + 10)) == []  # a sends it: b neither, nor msg_1
    (again,) = b.due_deliveries(now + 11, 10, set(), ("node-b:1", now + 21))  # a died mid-send: claim lapsed
    assert again.id == head.id and again.event_id == "msg_0"  # same webhook-id
    a.delivery_done(head.id, 200, "node-a:1")  # a's late answer: not its claim any more, changes nothing
    assert b.delivery(head.id, key.project_id).status == "pending"
    b.delivery_done(head.id, 200, "node-b:1")
    (nxt,) = a.due_deliveries(now + 11, 10, set(), ("node-a:1", now + 21))
    assert nxt.event_id == "msg_1"
    a.release_claims("node-a:")  # a restarted: its claims go at once
    assert [d.event_id for d in b.due_deliveries(now + 11, 10, set(), ("node-b:1", now + 21))] == ["msg_1"]


def test_concurrent_claims_never_take_one_task_twice(store_backend):
    """Several nodes claiming at once (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: one writer)."""
    setup = store_backend()
    _, key = setup.create_key("acme")
    for i in range(40):
        live_task(setup, key, f"tsk_{i:02d}", "node-dead", lease_until=time.time() - 1)
    setup.close()
    taken: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def node(name: str) -> None:
        store = store_backend()
        try:
            mine: list[str] = []
            for _ in range(20):
                mine += [r.id for r, _ in store.claim_tasks(claimant(name), mine, room=3)]
            taken[name] = mine
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=node, args=(f"node-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    every = [t for mine in taken.values() for t in mine]
    assert sorted(every) == [f"tsk_{i:02d}" for i in range(40)]  # each claimed exactly once
