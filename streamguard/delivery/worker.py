"""Durable, ordered, signed delivery of records and events.

Everything to send is first written to the outbox (store), in the same
transaction as the record or state change it reports. The worker here sends
from it:
- order: per stream (one task at one destination) one request at a time,
  oldest first; a later record never overtakes an earlier one;
- isolation: streams are independent, so a slow or dead receiver holds up only
  its own stream; at most `max_in_flight` requests run at once;
- at least once: a send that may have happened before a crash is sent again
  after restart, with the same webhook-id;
- across nodes (a shared store): each send first claims its row for the
  request's time limit, so one node at a time sends a stream's head; a
  node that dies mid-send leaves a claim that runs out, and another node
  sends that row again (same webhook-id: the only duplicate there can be);
- Standard Webhooks signing with the project's secret (and the previous one
  during a rotation's grace period).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
import uuid
from typing import Any

import aiohttp
import msgspec

from ..addresses import AddressPolicy, PolicyResolver, send_time_problem
from ..config import DeliverySettings
from ..metrics import Metrics
from ..schemas import JOB_EVENTS, STREAM_EVENTS
from ..store import AsyncStore, Store
from ..store.sqlite import DeliveryRow, OutboxItem, Project

log = logging.getLogger(__name__)

USER_AGENT = "streamguard-webhooks/1"


def new_event_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


# --- routing and envelopes ----------------------------------------------------------

# What a task's or job's own callback URL receives: its records and lifecycle events.
CALLBACK_EVENTS = frozenset(STREAM_EVENTS + JOB_EVENTS)


def destinations(project: Project, callback_url: str | None, event: str) -> list[str]:
    """Where an event goes: the task's or job's callback (its own events) and
    the project webhook when subscribed (an empty subscription list means every event)."""
    urls = []
    if callback_url and event in CALLBACK_EVENTS:
        urls.append(callback_url)
    if project.webhook_url and (not project.webhook_events or event in project.webhook_events):
        if project.webhook_url not in urls:
            urls.append(project.webhook_url)
    return urls


def envelope(event: str, event_id: str, project_id: str, metadata: Any, data: Any) -> bytes:
    """The reference's webhook envelope; stream.segment bodies are the record itself."""
    return msgspec.json.encode({
        "event": event, "eventId": event_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "projectId": project_id, "metadata": metadata, "data": data,
    })


def outbox_items(project: Project, task_id: str | None, callback_url: str | None, event: str,
                 body: bytes, event_id: str, stream: str | None = None) -> list[OutboxItem]:
    """One item per destination; `stream` names an ordering scope of its own
    within the task (OutboxItem.stream)."""
    return [OutboxItem(event_id, project.id, task_id, url, event, body, stream)
            for url in destinations(project, callback_url, event)]


# --- signing (Standard Webhooks) ----------------------------------------------------------

def _secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_") + "==")


def sign(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig>` per secret, space-separated (receivers accept any match)."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_secret_bytes(s), to_sign, hashlib.sha256).digest()).decode()
        for s in secrets)


# --- the worker -----------------------------------------------------------------------------

def backoff(attempts: int, settings: DeliverySettings) -> float:
    """Wait before attempt `attempts + 1`: exponential with +-20% jitter."""
    base = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** (attempts - 1))
    return base * random.uniform(0.8, 1.2)


class DeliveryWorker:
    def __init__(self, store: AsyncStore, settings: DeliverySettings, metrics: Metrics,
                 node: str | None = None) -> None:
        """`node`: this node's id when several nodes send from one outbox (claims are then taken)."""
        self.store = store
        self._claim_prefix = None if node is None else f"{node}:"
        self._claim = None if node is None else f"{node}:{uuid.uuid4().hex[:12]}"
        self.settings = settings
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task] = {}  # stream_key -> its one request
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task | None = None
        self._projects: dict[str, tuple[float, Project]] = {}
        self._stats_at = float("-inf")
        self.policy = AddressPolicy.for_delivery(settings)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_in_flight,
            resolver=None if self.policy.allow_private else PolicyResolver(self.policy))
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            headers={"User-Agent": USER_AGENT})
        self._runner = asyncio.create_task(self._run(), name="delivery")

    def _claim_until(self) -> tuple[str, float] | None:
        # a claim outlives its request (timeout) by a margin for the store writes around it
        return None if self._claim is None else (self._claim, time.time() + self.settings.timeout + 10.0)

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Give in-flight requests a moment to finish; the rest stays in the
        outbox and goes out after restart."""
        if self._runner is not None:
            self._runner.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=flush_timeout)
        for task in self._inflight.values():
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        if self._claim_prefix is not None:
            try:  # what a previous process of this node claimed goes out again now, not when its claim runs out
                await self.store(Store.release_claims, self._claim_prefix)
            except Exception:
                log.exception("releasing this node's earlier delivery claims failed")
        while True:
            try:
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive any one bad row or store hiccup
                log.exception("delivery dispatch failed")
            await self._sleep()

    async def _dispatch(self) -> None:
        free = self.settings.max_in_flight - len(self._inflight)
        if free <= 0:
            return
        rows = await self.store(Store.due_deliveries, time.time(), free, set(self._inflight), self._claim_until())
        for row in rows:
            task = asyncio.create_task(self._send(row))
            self._inflight[row.stream_key] = task
            task.add_done_callback(lambda _t, key=row.stream_key: self._done(key))
        if time.monotonic() - self._stats_at >= 1.0:  # gauges need no more than one count a second
            self._stats_at = time.monotonic()
            count, oldest = await self.store(Store.outbox_stats)
            self.metrics.outbox_depth.set(count)
            self.metrics.outbox_oldest_age.set(time.time() - oldest if oldest else 0)

    def _done(self, key: str) -> None:
        self._inflight.pop(key, None)
        self._wake.set()  # its stream may have a next item

    async def _sleep(self) -> None:
        next_due = await self.store(Store.next_due)
        delay = 1.0 if next_due is None else min(1.0, max(0.0, next_due - time.time()))
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass

    async def _project(self, project_id: str) -> Project | None:
        cached = self._projects.get(project_id)
        if cached and time.monotonic() - cached[0] < 2.0:  # rotations reach senders within seconds
            return cached[1]
        project = await self.store(Store.project, project_id)
        if project is not None:
            self._projects[project_id] = (time.monotonic(), project)
        return project

    async def _post(self, row: DeliveryRow, headers: dict[str, str]) -> tuple[int | None, str | None]:
        """One attempt: (HTTP status if any, error or None). The URL is checked
        again first: it may have been stored under other settings, or before a
        restart."""
        assert self._session is not None
        problem = send_time_problem(row.url, self.policy)
        if problem is not None:
            return None, problem
        try:
            async with self._session.post(row.url, data=row.body, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return resp.status, None
                return resp.status, f"HTTP {resp.status}" + (
                    " (redirects are not followed)" if 300 <= resp.status < 400 else "")
        except asyncio.TimeoutError:
            return None, f"no response within {self.settings.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a URL the client cannot parse
            return None, str(exc) or type(exc).__name__

    async def _send(self, row: DeliveryRow) -> None:
        project = await self._project(row.project_id)
        if project is None:
            await self.store(Store.delivery_failed_attempt, row.id, "project no longer exists", None, None,
                             self._claim)
            return
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": row.event_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(project.signing_secrets(time.time()), row.event_id, ts, row.body),
            "X-StreamGuard-Event": row.event,
        }
        status, error = await self._post(row, headers)
        self.metrics.delivery_attempts.inc()
        if error is None:
            await self.store(Store.delivery_done, row.id, status, self._claim)
            self.metrics.deliveries.labels("delivered").inc()
            self.metrics.delivery_latency.observe(time.time() - row.created_at)
            return
        attempts = row.attempts + 1
        if attempts >= self.settings.max_attempts:
            await self.store(Store.delivery_failed_attempt, row.id, error, status, None, self._claim)
            self.metrics.deliveries.labels("failed").inc()
            log.warning("delivery %s to %s failed for good after %d attempts: %s", row.id, row.url, attempts, error)
            return
        await self.store(Store.delivery_failed_attempt, row.id, error, status,
                         time.time() + backoff(attempts, self.settings), self._claim)
        self.metrics.deliveries.labels("retry").inc()
