"""The store, on SQLite and on a real PostgreSQL (each test runs on both):
migrations, keys, atomic charging, outbox order, retention."""

import asyncio
import time

import pytest

from streamguard.store import AsyncStore, Store
from streamguard.store.migrations import MIGRATIONS
from streamguard.store.sqlite import InsufficientBalance, KeyRevoked, LeaseLost, OutboxItem, TaskRow, hash_key


@pytest.fixture
def store(store_backend):
    s = store_backend()
    yield s
    s.close()


def task(store: Store, key_id: str, project_id: str) -> TaskRow:
    row = TaskRow(id="tsk_1", project_id=project_id, key_id=key_id, kind="stream", url="rtmp://x", params={},
                  state="running", created_at=time.time())
    store.create_task(row)
    return row


def test_wal_and_migrations_are_applied_once(store_backend):
    s = store_backend()
    assert s.schema_version == len(MIGRATIONS)
    if store_backend.kind == "sqlite":
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    again = store_backend()  # reopening migrates nothing
    assert again.schema_version == len(MIGRATIONS)
    again.close()


def test_keys_are_stored_hashed(store):
    key, info = store.create_key("acme", 100)
    raw = [tuple(r) for r in store.db.execute("SELECT key_hash FROM api_keys").fetchall()]
    assert raw == [(hash_key(key),)] and key not in str(raw)
    assert store.authenticate(key).project_id == info.project_id
    store.revoke_key(info.id)
    assert store.authenticate(key) is None


def test_charge_is_atomic_with_the_record(store):
    key, info = store.create_key("acme", 120)
    row = task(store, info.id, info.project_id)
    store.append_record(row.id, info.id, 0, 0, b"{}", cost=100)
    with pytest.raises(InsufficientBalance):
        store.append_record(row.id, info.id, 1, 0, b"{}", cost=100)
    assert store.balance(info.id) == 20
    assert [seq for seq, _ in store.records(row.id, -1, 10)] == [0]  # nothing stored for the unpaid one


def test_outbox_heads_keep_order_per_stream(store):
    key, info = store.create_key("acme")
    row = task(store, info.id, info.project_id)
    items = [OutboxItem(f"msg_{i}", info.project_id, row.id, url, "stream.segment", b"{}")
             for i in range(3) for url in ("http://a.example/", "http://b.example/")]
    store.enqueue(items)
    due = store.due_deliveries(time.time() + 1, 10, set())
    assert [(d.url, d.event_id) for d in due] == [("http://a.example/", "msg_0"), ("http://b.example/", "msg_0")]
    store.delivery_failed_attempt(due[0].id, "HTTP 500", 500, time.time() + 60)  # a's head waits
    store.delivery_done(due[1].id, 204)
    due = store.due_deliveries(time.time() + 1, 10, set())
    assert [(d.url, d.event_id) for d in due] == [("http://b.example/", "msg_1")]  # a is not overtaken


def test_retention_purges_old_records_and_settled_deliveries(store):
    key, info = store.create_key("acme")
    row = task(store, info.id, info.project_id)
    store.append_record(row.id, info.id, 0, 0, b"{}", outbox=[
        OutboxItem("msg_0", info.project_id, row.id, "http://a.example/", "stream.segment", b"{}")])
    store.db.execute("UPDATE records SET created_at = created_at - 10 * 86400")
    store.db.execute("UPDATE deliveries SET created_at = created_at - 10 * 86400")
    store.append_record(row.id, info.id, 1, 0, b"{}")
    assert store.purge(time.time() - 3 * 86400) == 1
    assert [seq for seq, _ in store.records(row.id, -1, 10)] == [1]
    assert store.outbox_stats()[0] == 1  # the old one was still pending: kept


def test_a_revoked_key_pays_for_no_record_but_its_terminal_record_is_stored(store, store_backend):
    key, info = store.create_key("acme", 1000)
    row = task(store, info.id, info.project_id)
    store.append_record(row.id, info.id, 0, 0, b"{}", cost=10)
    other = store_backend()  # `streamguard keys revoke`: another connection, another process
    assert other.revoke_key(key)
    assert other.revoked_keys([info.id, "key_unknown"]) == {info.id, "key_unknown"}
    other.close()
    with pytest.raises(KeyRevoked):
        store.append_record(row.id, info.id, 1, 0, b"{}", cost=10)
    store.append_record(row.id, info.id, 1, 14, b"{}", final_state=(14, "API key revoked"))
    assert [seq for seq, _ in store.records(row.id, -1, 10)] == [0, 1]
    assert store.balance(info.id) == 990 and store.task(row.id).state == "stopped"


def test_reads_answer_while_a_write_waits_on_a_lock(store_backend):
    """Status reads run on their own connection: a write stuck on another process's
    lock (SQLite: up to the busy timeout; PostgreSQL: a row lock) does not hold them up."""
    async def scenario() -> float:
        if store_backend.kind == "sqlite":
            s = AsyncStore(store_backend())
        else:
            from streamguard.store.postgres import PgAsyncStore
            s = await PgAsyncStore(store_backend.url).open()
        key, info = await s(Store.create_key, "acme", None)
        row = TaskRow(id="tsk_1", project_id=info.project_id, key_id=info.id, kind="stream", url="rtmp://x",
                      params={}, state="running", created_at=time.time())
        await s(Store.create_task, row)
        lock = store_backend()
        if store_backend.kind == "sqlite":
            lock.db.execute("BEGIN EXCLUSIVE")
        else:
            lock.db.execute("BEGIN")
            lock.db.execute("SELECT id FROM tasks WHERE id = 'tsk_1' FOR UPDATE")
        write = asyncio.create_task(s(Store.add_reconnect, "tsk_1"))  # waits for the lock
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        assert (await s(Store.task, "tsk_1")).state == "running"
        assert await s(Store.authenticate, key) is not None
        took = time.monotonic() - t0
        assert not write.done()
        lock.db.execute("ROLLBACK")
        lock.close()
        await write
        assert (await s(Store.task, "tsk_1")).reconnects == 1
        await s.aclose()
        return took

    assert asyncio.run(scenario()) < 1.0


def test_an_unreachable_database_is_one_clear_line_without_its_password(cli, tmp_path):
    port = __import__("daemon").free_port()  # nothing listens there
    res = cli("keys", "create", "--project", "acme", "--data-dir", tmp_path,
              env={"STREAMGUARD_STORAGE__DATABASE_URL": f"postgresql://sg:hunter2@127.0.0.1:{port}/sg"})
    assert res.returncode == 1, res.stderr
    assert f"cannot open the database 127.0.0.1:{port}/sg" in res.stderr and "hunter2" not in res.stderr
    assert "Traceback" not in res.stderr
    bad = cli("keys", "create", "--project", "acme", env={"STREAMGUARD_STORAGE__DATABASE_URL": "mysql://x"})
    assert bad.returncode == 1 and "storage.database_url must be empty (SQLite) or a postgresql:// URL" in bad.stderr


def test_logo_gallery_rows_and_cached_embeddings(store):
    """The gallery's SQL (issue 12) on both databases: add to a logo by name,
    limits, per-model embedding cache (upsert), project scope, delete."""
    _, a = store.create_key("acme")
    _, b = store.create_key("other")
    blob = b"\x00" * 16
    logo = store.add_logo_image(a.project_id, "Blue", [("img_1", "logos/p/img_1.png", blob)], "fp1", 4,
                                max_logos=2, max_images=2)
    assert store.add_logo_image(a.project_id, "Blue", [("img_2", "logos/p/img_2.png", blob)], "fp1", 4,
                                max_logos=2, max_images=2) == logo  # same name: same logo
    assert store.add_logo_image(a.project_id, "Blue", [("img_3", "p3", blob)], "fp1", 4,
                                max_logos=2, max_images=2) is None  # past max_images, nothing written
    rows, total = store.logos(a.project_id, 1, 10)
    assert total == 1 and [i for i, _ in rows[0][3]] == ["img_1", "img_2"]
    assert store.logos(b.project_id, 1, 10) == ([], 0)
    assert [r[4] for r in store.gallery(a.project_id, "fp2")] == [None, None]  # not cached for a new model
    store.save_logo_embeddings([("img_1", "fp2", 4, b"\x01" * 16), ("img_gone", "fp2", 4, blob)])
    store.save_logo_embeddings([("img_1", "fp2", 4, b"\x02" * 16)])  # recomputed: replaced
    assert [bytes(r[4]) if r[4] is not None else None for r in store.gallery(a.project_id, "fp2")] == \
        [b"\x02" * 16, None]
    assert store.logo_counts() == {a.project_id: 1}
    assert store.delete_logo(logo, b.project_id) is None
    assert sorted(store.delete_logo(logo, a.project_id)) == ["logos/p/img_1.png", "logos/p/img_2.png"]
    assert store.logos(a.project_id, 1, 10) == ([], 0)


def test_alerts_list_after_a_cursor_and_keep_cooldowns(store):
    """Frame alerts (issue 15) on both databases: stored with their outbox
    rows, listed after a cursor per project and task, latest time per category."""
    _, info = store.create_key("acme")
    row = task(store, info.id, info.project_id)
    store.add_alerts(row.id, info.project_id, [("evt_1", "violence", 1.0, b"{}"), ("evt_2", "weapons", 2.0, b"{}")],
                     [OutboxItem("evt_1", info.project_id, row.id, "http://x/hook", "stream.alert", b"{}")])
    store.add_alerts(row.id, info.project_id, [("evt_3", "violence", 12.5, b"{}")], [])
    listed = store.alerts(info.project_id, row.id, -1, 10)
    assert [e for _, e, _, _ in listed] == ["evt_1", "evt_2", "evt_3"]
    assert [e for _, e, _, _ in store.alerts(info.project_id, None, listed[0][0], 10)] == ["evt_2", "evt_3"]
    assert store.last_alert_times(row.id) == {"violence": 12.5, "weapons": 2.0}


def test_an_alert_from_a_stale_claim_is_refused(store):
    """A node that lost a task (stale epoch) stores no alert and sends none."""
    _, info = store.create_key("acme")
    row = task(store, info.id, info.project_id)
    with store._tx():  # another node took it over
        store.db.execute("UPDATE tasks SET epoch = 2 WHERE id = ?", (row.id,))
    with pytest.raises(LeaseLost):
        store.add_alerts(row.id, info.project_id, [("evt_old", "violence", 1.0, b"{}")],
                         [OutboxItem("evt_old", info.project_id, row.id, "http://x/hook", "stream.alert", b"{}")],
                         epoch=1)
    store.add_alerts(row.id, info.project_id, [("evt_new", "violence", 1.0, b"{}")], [], epoch=2)
    assert [e for _, e, _, _ in store.alerts(info.project_id, row.id, -1, 10)] == ["evt_new"]
    assert store.outbox_stats()[0] == 0
