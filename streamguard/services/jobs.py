"""File jobs (CONTRACT §2 "File jobs"): submit, the durable queue, the runner.

A job is a kind="job" task (records, charging and the outbox are shared with
live tasks) plus its `jobs` row. Jobs wait in the store; one dispatcher per
node runs at most `jobs.concurrency` of them at a time, those a previous
process left PROCESSING first, then PENDING ones, oldest first.

One run: the input (downloaded, or the upload) -> probe -> ingest in a worker
thread into a staging dir outside the media root -> each closed segment's
record built, stored, charged and queued for delivery in one transaction ->
the staging dir renamed to media/<job>/ (a reader never sees a half job) ->
COMPLETED with its summary and video.conversion.completed in one transaction.

A job with S3 output (its s3Config or the project's default, outputs.py)
checks its bucket before it reads the input, uploads each segment's files
as soon as its record is stored, and at the end uploads what is left, the
playlists and the master last (media/storage.upload_tree); it completes only
once every object is stored, and fails with UPLOAD_FAILED, naming what is
wrong (credentials, bucket, endpoint), when the store refuses after retries.
Nothing of it stays on this node.
A job run again after a restart starts from the start and skips the segments
already stored (they are not stored, charged or delivered twice); its
started event went out with its first run and its completed event goes out
once. SIGTERM stops running jobs where they are: they stay PROCESSING and
run again at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec

from ..addresses import AddressPolicy, check_host, validate_callback_url
from ..analysis.analyzer import Analyzer
from ..analysis.categorize import CategoryEvidence, summarize_categorization
from ..analysis.logos import LogoTally
from .logos import LogoService
from ..config import Settings
from ..threads import in_thread
from ..delivery.worker import DeliveryWorker, envelope, new_event_id, outbox_items
from ..errors import (AddressRefused, ConfigError, Conflict, InputInvalid, InputUnreachable,
                      InsufficientBalance, NotFound, PayloadTooLarge, StreamGuardError, Unavailable)
from ..inputs.fetch import FetchLimits, download
from ..inputs.sniff import VideoInfo, probe_video
from ..media.hls import segment_name
from ..media.retention import DiskSpace
from ..media.storage import StorageError, TreeUpload, open_s3
from ..media.source import MediaSource, SourceOptions
from ..metrics import Metrics
from ..pipeline.segments import (ClosedSegment, IngestResult, MediaLocator, PipelineOptions, RecordAssembler,
                                 StopMode, ingest)
from ..schemas import (JobFlaggedFrame, Job, JobListQuery, JobOptions, JobRequest, LogoSummary, ModerationSummary,
                      RecordQuery, SegmentRecord, TokenUsage, Violation, encoder, iso)
from ..store import AsyncStore, Store
from ..store.sqlite import InsufficientBalance as StoreInsufficientBalance
from ..store.sqlite import Claimant, JobRow, KeyRevoked, LeaseLost, OutboxItem, Principal, TaskRow, new_id
from ..secretbox import SecretBox
from . import outputs
from .cluster import Ownership
from .streams import Event, SegmentQueue, segment_event

log = logging.getLogger(__name__)


# The dispatcher also looks at the queue this often when nothing woke it
# (another process on the same store, a job whose run ended abnormally).
DISPATCH_INTERVAL = 5.0
# errorCode of a FAILED job.
DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
INPUT_INVALID = "INPUT_INVALID"
INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
KEY_REVOKED = "KEY_REVOKED"
UPLOAD_FAILED = "UPLOAD_FAILED"
INTERNAL = "INTERNAL"


class JobFailed(Exception):
    """Ends a job FAILED with `code` and a message its user can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- requests ----------------------------------------------------------------------------------

def job_params(opts: JobOptions, output_base: str | None) -> dict[str, Any]:
    """The settings stored with a job: the alias resolved, nothing secret (the
    s3Config is stored apart, sealed); `outputBase`: where its media is served
    (cdnUrl or the S3 URL of its folder; None: /media on this node)."""
    params = msgspec.to_builtins(opts)
    params.pop("hlsTime", None)
    params.pop("s3Config", None)
    params.pop("inputUrl", None)
    params["segmentSeconds"] = opts.segment_seconds
    if output_base is not None:
        params["outputBase"] = output_base
    return params


# --- the job object and its events ------------------------------------------------------------------

def job_view(row: JobRow, public_url: str) -> Job:
    params = row.task.params
    done = row.status == "COMPLETED"
    base = params.get("outputBase") or f"{public_url}/media/{row.id}"
    outputs = row.outputs if done and row.outputs is not None else params["outputFormats"]
    moderation = (row.summary or {}).get("moderation")
    logos = (row.summary or {}).get("logoDetection")
    return Job(
        id=row.id, projectId=row.task.project_id, status=row.status, progress=round(row.progress, 4),  # type: ignore[arg-type]
        inputUrl=row.task.url or None, outputFormats=outputs,
        outputUrl=f"{base}/master.m3u8" if done else None, thumbnailUrl=f"{base}/thumbnail.jpg" if done else None,
        renditionUrls={r: f"{base}/{r}/playlist.m3u8" for r in outputs} if done else None,
        durationSec=row.duration, segmentsCount=row.task.segments,
        moderation=msgspec.convert(moderation, ModerationSummary) if moderation is not None else None,
        categorization=(row.summary or {}).get("categorization"),
        logoDetection=msgspec.convert(logos, LogoSummary) if logos is not None else None, tokens=TokenUsage.of(row.video_tokens, row.text_tokens),
        metadata=params.get("metadata"), errorCode=row.error_code, errorMessage=row.error_message,
        createdAt=iso(row.task.created_at) or "", startedAt=iso(row.task.started_at), completedAt=iso(row.completed_at))


def job_outbox(store: Store, row: JobRow, events: list[Event]) -> list[OutboxItem]:
    """Runs on the store thread: each event for the job's callback and the project webhook."""
    project = store.project(row.task.project_id)
    if project is None:
        return []
    callback = row.task.params.get("callbackUrl")
    return [item for name, event_id, body in events
            for item in outbox_items(project, row.id, callback, name, body, event_id)]


def lifecycle_events(name: str, public_url: str) -> Callable[[Store, JobRow], list[OutboxItem]]:
    """video.conversion.* for a job as its transaction leaves it: data = the job object plus jobId."""
    def build(store: Store, row: JobRow) -> list[OutboxItem]:
        event_id = new_event_id()
        data = {**msgspec.to_builtins(job_view(row, public_url)), "jobId": row.id}
        return job_outbox(store, row, [(name, event_id, envelope(name, event_id, row.task.project_id,
                                                                   row.task.params.get("metadata"), data))])
    return build


def store_job_record(store: Store, row: JobRow, seq: int, status: int, body: bytes, **kwargs: Any) -> None:
    """Runs on the store thread: record, charge, progress and its delivery in one transaction."""
    store.append_job_record(row.id, row.task.key_id, seq, status, body,
                            outbox=job_outbox(store, row, [segment_event(body)]), epoch=row.task.epoch, **kwargs)


# --- the job summary ----------------------------------------------------------------------------------

def summarize(records: list[bytes]) -> ModerationSummary:
    """The job's verdict from its stored records (so a job run again after a
    restart sums the records of both runs): per category the max score and the
    highest-confidence violation; flagged frames numbered over the job's sampled frames."""
    scores: dict[str, float] = {}
    worst: dict[str, Violation] = {}
    flagged: list[JobFlaggedFrame] = []
    frames = processing_ms = 0
    for body in records:
        record = msgspec.json.decode(body, type=SegmentRecord)
        data = record.data.data
        if record.data.status != 0 or data is None or data.content_moderation is None:
            continue
        cm = data.content_moderation
        for category, score in cm.scores.items():
            scores[category] = max(score, scores.get(category, 0.0))
        for v in cm.violations:
            if v.category not in worst or v.confidence > worst[v.category].confidence:
                worst[v.category] = v
        flagged += [JobFlaggedFrame(frameIndex=frames + f.frame_index, time=float(f.time),
                                    segmentIndex=data.segment_index, violations=f.violations)
                    for f in cm.flagged_frames]
        frames += cm.frames_processed
        processing_ms += int(data.processing_time_ms)
    violations = sorted(worst.values(), key=lambda v: -v.confidence)
    return ModerationSummary(safe=not violations, violations=violations, scores=scores, flaggedFrames=flagged,
                             framesAnalyzed=frames, processingTimeMs=processing_ms)


def summarize_logos(records: list[bytes], max_logos: int) -> LogoSummary:
    """The job's logos from its stored records (like `summarize`): per logo
    its best sighting over the whole job, frames numbered over the job's
    sampled frames."""
    tally = LogoTally()
    for body in records:
        record = msgspec.json.decode(body, type=SegmentRecord)
        data = record.data.data
        if record.data.status == 0 and data is not None and data.logo_detection is not None:
            tally.add(data.segment_index, data.logo_detection)
    return tally.summary(max_logos)


def last_end(records: list[tuple[int, bytes]]) -> float | None:
    """The job's duration on its timeline: where its last segment with data ends."""
    for _, body in reversed(records):
        data = msgspec.json.decode(body, type=SegmentRecord).data.data
        if data is not None:
            return round(float(data.end_time), 3)
    return None


def progress_at(end: float, duration: float | None, index: int) -> float:
    """Share of the job done once the segment ending at `end` is stored (1.0 only when COMPLETED)."""
    share = end / duration if duration else (index + 1) / (index + 2)
    return min(0.99, max(0.0, share))


# --- files ------------------------------------------------------------------------------------------

def publish(staging: Path, dest: Path, trash: Path) -> None:
    """Put a finished job's media in place by rename: a reader sees the old
    folder (from a run that died before its COMPLETED was stored) or the new
    one, never a half-written one."""
    if dest.exists():
        os.rename(dest, trash)
    os.rename(staging, dest)
    shutil.rmtree(trash, ignore_errors=True)



@dataclass
class RunningJob:
    row: JobRow
    task: asyncio.Task | None = None
    stop: str | None = None  # a StopMode once the run must end early
    failure: JobFailed | None = None  # why it ended early (None: drain, it runs again)
    lost: bool = False  # another node took the job over (this node's lease lapsed): it writes nothing more
    next_seq: int = 0  # segments below this are stored already (an earlier run)
    # categorization evidence of every segment of this run (analysis/categorize.py)
    categories: CategoryEvidence = field(default_factory=CategoryEvidence.empty)


class JobService:
    def __init__(self, settings: Settings, store: AsyncStore, analyzer: Analyzer | None, metrics: Metrics,
                 public_url: str, delivery: DeliveryWorker, *, disk: DiskSpace | None = None,
                 model_error: str | None = None, secrets: SecretBox | None = None,
                 ownership: Ownership | None = None, logos: LogoService | None = None) -> None:
        self.settings = settings
        self.secrets = secrets or SecretBox.from_settings(settings)
        self.store = store
        self.ownership = ownership or Ownership.of(settings)
        self.analyzer = analyzer
        self.logos = logos  # the project galleries
        self.model_error = model_error
        self.metrics = metrics
        self.public_url = public_url.rstrip("/")
        self.delivery = delivery
        self.disk = disk or DiskSpace(settings.data_dir, settings.storage.min_free_bytes)
        self.media_root = settings.data_dir / "media"
        self.work_root = settings.data_dir / "jobs"  # inputs and staging, outside what /media serves
        self.running: dict[str, RunningJob] = {}
        self.draining = False
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None

    # --- queries ----------------------------------------------------------------------------

    async def get(self, principal: Principal, job_id: str) -> JobRow:
        row = await self.store(Store.job, job_id, principal.project_id)
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return row

    async def list_jobs(self, principal: Principal, query: JobListQuery) -> tuple[list[JobRow], int]:
        return await self.store(Store.list_jobs, principal.project_id, query.status or None, query.page,
                                query.pageSize)

    async def records(self, principal: Principal, job_id: str,
                      query: RecordQuery) -> tuple[JobRow, list[tuple[int, bytes]]]:
        """The job (read first: once it has ended no more records come) and its records after `query.after`."""
        row = await self.get(principal, job_id)
        return row, await self.store(Store.records, row.id, query.after, query.limit)

    def view(self, row: JobRow) -> Job:
        return job_view(row, self.public_url)

    # --- submit and cancel ------------------------------------------------------------------------

    async def check_admission(self, principal: Principal, moderate: bool = False) -> None:
        """What refuses any job before its input is looked at: draining, low
        disk, no model for moderation (503), no balance (402)."""
        if self.draining:
            raise Unavailable("this node is draining and accepts no new jobs")
        low = self.disk.reason()
        if low is not None:
            raise Unavailable(f"not accepting new jobs: {low}", details={"reason": "low_disk"})
        if moderate and self.analyzer is None:
            raise Unavailable(f"moderation is unavailable on this node: {self.model_error}",
                              details={"reason": "model_not_loaded"})
        balance = await self.store(Store.balance, principal.key_id)
        if balance is not None and balance <= 0:
            raise InsufficientBalance("the API key has no token balance left", details={"balance": balance})

    async def submit(self, principal: Principal, req: JobRequest) -> JobRow:
        """POST /v1/jobs: every check, then the job is stored PENDING (201)."""
        await self.check_admission(principal, req.moderate or req.categorize or req.detectLogos)
        policy = AddressPolicy.for_sources(self.settings.sources)
        await check_host(req.inputUrl, "inputUrl", policy)
        if req.s3Config is not None:
            await outputs.check_endpoint(req.s3Config, "s3Config", policy)
        return await self._create(principal, req, new_id("job"), req.inputUrl, None)

    def upload_dir(self) -> tuple[str, Path]:
        """A new job id and the folder its upload is received into (removed by the caller if it fails)."""
        job_id = new_id("job")
        path = self.work_root / job_id
        path.mkdir(parents=True)
        return job_id, path

    async def submit_upload(self, principal: Principal, opts: JobOptions, job_id: str, path: Path) -> JobRow:
        """POST /v1/jobs/upload, once the file is on disk: it must be video (400, by content)."""
        await self.check_admission(principal, opts.moderate or opts.categorize or opts.detectLogos)
        if opts.s3Config is not None:
            await outputs.check_endpoint(opts.s3Config, "s3Config", AddressPolicy.for_sources(self.settings.sources))
        await asyncio.get_running_loop().run_in_executor(None, probe_video, path)
        return await self._create(principal, opts, job_id, "", path)

    async def _create(self, principal: Principal, opts: JobOptions, job_id: str, url: str,
                      upload: Path | None) -> JobRow:
        if opts.callbackUrl:
            await validate_callback_url(opts.callbackUrl, "callbackUrl", self.settings.delivery)
        project = await self.store(Store.project, principal.project_id)
        default = outputs.unseal(self.secrets, project.storage) if project and project.storage else None
        config = outputs.job_config(opts.s3Config, default, job_id)
        base = outputs.target(config).object_url("") if config is not None else None
        task = TaskRow(id=job_id, project_id=principal.project_id, key_id=principal.key_id, kind="job", url=url,
                       params=job_params(opts, base), state="starting", created_at=time.time())
        await self.store(Store.create_job, task, None if upload is None else str(upload),
                         None if config is None else outputs.seal(self.secrets, config))
        self.metrics.jobs_submitted.inc()
        row = await self.store(Store.job, job_id)  # read before the dispatcher may claim it: the reply says PENDING
        assert row is not None
        self._wake.set()
        return row

    async def cancel(self, principal: Principal, job_id: str) -> JobRow:
        """Only a PENDING job is cancelled; any other is 409."""
        result = await self.store(Store.cancel_job, job_id, principal.project_id)
        if result is None:
            raise NotFound(f"job {job_id} not found")
        row, cancelled = result
        if not cancelled:
            raise Conflict(f"job {job_id} is {row.status}: only a PENDING job can be cancelled",
                           details={"status": row.status})
        self.metrics.jobs_ended.labels("CANCELLED").inc()
        await self._cleanup(job_id)
        return row

    # --- the queue ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="jobs")

    async def sweep_work(self) -> int:
        """At start: remove what ended jobs and interrupted uploads left under
        the work root (a crash between receiving a file and storing its job)."""
        # every queued or running job, whichever node has it (nodes may share this data dir)
        everyone = Claimant(self.ownership.node, time.time(), time.time(), any_owner=True)
        queued = {row.id for row in await self.store(Store.runnable_jobs, [], 1_000_000, everyone)}

        def sweep() -> int:
            stale = [p for p in self.work_root.iterdir() if p.name not in queued] if self.work_root.is_dir() else []
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            return len(stale)
        return await asyncio.get_running_loop().run_in_executor(None, sweep)

    async def _dispatch_loop(self) -> None:
        while not self.draining:
            self._wake.clear()
            try:
                await self._dispatch()
            except Exception:  # the store is failing: try again at the next wake-up
                log.exception("job dispatch failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=DISPATCH_INTERVAL)
            except asyncio.TimeoutError:
                pass

    async def _dispatch(self) -> None:
        while not self.draining:
            free = self.settings.jobs.concurrency - len(self.running)
            if free <= 0:
                return
            rows = await self.store(Store.runnable_jobs, list(self.running), free, self.ownership.claimant())
            if not rows or self.draining:
                return
            for row in rows:
                running = RunningJob(row)
                self.running[row.id] = running
                running.task = asyncio.create_task(self._run(running), name=f"job-{row.id}")

    async def _run(self, running: RunningJob) -> None:
        job_id = running.row.id
        self.metrics.jobs_running.inc()
        try:
            try:
                row = await self.store(Store.claim_job, job_id,
                                       lifecycle_events("video.conversion.started", self.public_url),
                                       self.ownership.claimant())
            except Exception as exc:  # the store is failing: the job stays queued for a later look
                log.error("job %s: cannot start it now: %s", job_id, exc)
                await asyncio.sleep(DISPATCH_INTERVAL)
                return
            if row is None:
                return  # cancelled, or claimed by another node, between the dispatcher's look and the claim
            self.delivery.wake()
            running.row, running.next_seq = row, row.task.next_seq
            if row.attempts > 1:
                log.warning("job %s: running again from the start (attempt %d; %d segment(s) stored already)",
                            job_id, row.attempts, row.task.next_seq)
            try:
                await self._process(running)
            except LeaseLost:
                self.lost([job_id])
            except JobFailed as failure:
                await self._fail(running, failure)
            except Exception as exc:
                log.exception("job %s failed", job_id)
                await self._fail(running, JobFailed(INTERNAL, f"internal error: {type(exc).__name__}"))
        finally:
            self.metrics.jobs_running.dec()
            self.running.pop(job_id, None)
            self._wake.set()

    # --- one run ------------------------------------------------------------------------------------

    async def _process(self, running: RunningJob) -> None:
        row = running.row
        params = row.task.params
        if (params["moderate"] or params.get("categorize") or params.get("detectLogos")) and self.analyzer is None:
            raise JobFailed(INTERNAL, f"moderation is unavailable on this node: {self.model_error}")
        work = self.work_root / row.id
        staging = work / "staging"
        await asyncio.get_running_loop().run_in_executor(None, lambda: shutil.rmtree(staging, ignore_errors=True))
        path = await self._input(row, work)
        if running.stop:
            return
        info = await self._probe(path)
        opts = PipelineOptions(segment_seconds=params["segmentSeconds"], fps=params["fps"],
                               threshold=params["threshold"], moderate=params["moderate"],
                               categorize=bool(params.get("categorize")),
                               top_k=self.settings.pipeline.categorization_top_k,
                               thresholds=self.settings.pipeline.thresholds,
                               renditions=tuple(params["outputFormats"]), x264_preset=params["ffmpegPreset"],
                               logos=self.logos.source(row.task.project_id)
                               if params.get("detectLogos") and self.logos is not None else None,
                               max_logos=params.get("maxLogos", 5))
        upload = await self._open_upload(row, staging)
        try:
            result = await self._ingest(running, path, info, opts, staging, upload)
            if running.lost:
                return  # another node runs it now
            if running.failure is not None:
                raise running.failure
            if running.stop:
                return  # drained: it stays PROCESSING and runs again at the next start
            if result.error:
                raise JobFailed(INPUT_INVALID,
                                f"the input could not be read to its end: {self._plain(result.error, path)}")
            if result.segments == 0:
                raise JobFailed(INPUT_INVALID, "the input has no video that could be read")
            await self._complete(running, result, staging, upload)
        finally:
            if upload is not None:
                upload.abort()
                upload.storage.close()

    async def _open_upload(self, row: JobRow, staging: Path) -> TreeUpload | None:
        """A job with S3 output: its bucket checked (before any work is spent
        on it) and an upload ready to take its files as they close."""
        if row.storage is None:
            return None
        try:
            config = outputs.unseal(self.secrets, row.storage)
        except ConfigError as exc:
            raise JobFailed(UPLOAD_FAILED, f"the job's S3 settings cannot be read on this node: {exc.message}") from None
        s3 = self.settings.storage.s3
        storage = None
        try:
            storage = open_s3(outputs.target(config), s3)
            await in_thread(storage.check, f"s3-check-{row.id}")
        except StorageError as err:
            if storage is not None:
                storage.close()
            self.metrics.upload_failures.labels(err.reason).inc()
            raise JobFailed(UPLOAD_FAILED, err.message) from None
        return TreeUpload(storage, staging, s3.concurrency)

    async def _input(self, row: JobRow, work: Path) -> Path:
        """The uploaded file, or the input URL downloaded (again, on a second run) under the address rules."""
        if row.input_path:
            path = Path(row.input_path)
            if not path.is_file():
                raise JobFailed(INPUT_INVALID, "the uploaded file is no longer on this node")
            return path
        work.mkdir(parents=True, exist_ok=True)
        dest = work / "input"
        jobs = self.settings.jobs
        try:
            await download(row.task.url, dest, sources=self.settings.sources,
                           limits=FetchLimits(max_bytes=jobs.download_max_bytes, timeout=jobs.download_timeout))
        except (AddressRefused, InputUnreachable, PayloadTooLarge) as exc:
            raise JobFailed(DOWNLOAD_FAILED, exc.message) from None
        except InputInvalid as exc:
            raise JobFailed(INPUT_INVALID, exc.message) from None
        return dest

    async def _probe(self, path: Path) -> VideoInfo:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, probe_video, path)
        except StreamGuardError as exc:
            raise JobFailed(INPUT_INVALID, self._plain(exc.message, path)) from None

    @staticmethod
    def _plain(message: str, path: Path) -> str:
        """A media error in the user's terms: the node's own paths are not theirs."""
        return message.replace(str(path), "the input")

    async def _ingest(self, running: RunningJob, path: Path, info: VideoInfo, opts: PipelineOptions,
                      staging: Path, upload: TreeUpload | None) -> IngestResult:
        """The pipeline in a worker thread; its records stored here, in order,
        skipping those an earlier run stored."""
        row = running.row
        p = self.settings.pipeline
        source = MediaSource(str(path), SourceOptions(p.open_timeout, p.read_timeout, p.decode_threads))
        try:
            await in_thread(source.open, f"open-{row.id}")
        except StreamGuardError as exc:
            raise JobFailed(INPUT_INVALID, self._plain(exc.message, path)) from None
        loop = asyncio.get_running_loop()
        queue = SegmentQueue(loop)
        analyzer = self.analyzer if opts.analyze else None

        def emit(closed: ClosedSegment) -> None:
            queue.put(closed, lambda: running.stop is not None)

        def run() -> IngestResult:
            self.metrics.ingest_threads.inc()
            try:
                return ingest(source, opts, staging, analyzer, emit, should_stop=lambda: running.stop)
            finally:
                source.close()
                self.metrics.ingest_threads.dec()
                queue.close()

        done = in_thread(run, f"ingest-{row.id}")
        # (each closed segment names the rendition its record points into: the ladder knows what it wrote)
        base = row.task.params.get("outputBase") or f"{self.public_url}/media/{row.id}"
        assembler = RecordAssembler(row.id, opts, analyzer, MediaLocator(self.media_root / row.id, base))
        try:
            while (closed := await queue.get()) is not None:
                self.metrics.frames_decoded.inc(closed.frames_decoded)
                self.metrics.frames_sampled.inc(len(closed.frames))
                self.metrics.frames_reused.inc(closed.frames_reused)
                stored = closed.segment.index < running.next_seq  # by an earlier run
                if running.stop or stored and not opts.categorize:
                    for _, fut in closed.frames:  # nothing to store, or the job is ending
                        fut.cancel()
                    for probe in closed.probes:
                        probe.cancel()
                    continue
                record = await assembler.build(closed)  # adds to the job's categorization evidence
                running.categories = assembler.categories
                if stored:
                    continue
                if not running.stop:
                    await self._store_segment(running, closed, record, info.duration)
                if upload is not None:  # its files are complete: up they go while the next is cut
                    name = segment_name(closed.segment.index)
                    upload.submit(p for d in staging.iterdir() if d.is_dir() and (p := d / name).is_file())
        except BaseException:  # the store failed, or the run was cancelled: the ingest thread must end too
            running.stop = StopMode.NOW
            raise
        return await done

    async def _store_segment(self, running: RunningJob, closed: ClosedSegment, record: SegmentRecord,
                             duration: float | None) -> None:
        body = record.data
        token = body.token or TokenUsage.of(0, 0)
        moderation = body.data.content_moderation if body.data is not None else None
        seg = closed.segment
        try:
            await self.store(store_job_record, running.row, seg.index, body.status, encoder.encode(record),
                             cost=token.total, video_tokens=token.video_tokens, text_tokens=token.text_tokens,
                             flagged=bool(moderation and moderation.has_unsafe_content),
                             timeline_end=float(seg.end), progress=progress_at(float(seg.end), duration, seg.index))
        except StoreInsufficientBalance:
            self._end_now(running, JobFailed(INSUFFICIENT_BALANCE, f"the API key's balance cannot pay segment "
                                                                   f"{seg.index} ({token.total} tokens)"))
            return
        except KeyRevoked:
            self._end_now(running, JobFailed(KEY_REVOKED, "the API key was revoked"))
            return
        except LeaseLost:
            self.lost([running.row.id])
            return
        running.next_seq = seg.index + 1
        self.delivery.wake()
        self.metrics.segments.labels(str(body.status)).inc()

    def _end_now(self, running: RunningJob, failure: JobFailed | None) -> None:
        running.failure = running.failure or failure
        running.stop = StopMode.NOW

    async def _complete(self, running: RunningJob, result: IngestResult, staging: Path,
                        upload: TreeUpload | None) -> None:
        row = running.row
        records = await self.store(Store.records, row.id, -1, 1_000_000)
        params = row.task.params
        summary: dict[str, Any] = {}
        if params["moderate"]:
            summary["moderation"] = msgspec.to_builtins(summarize([body for _, body in records]))
        if params.get("detectLogos"):
            summary["logoDetection"] = msgspec.to_builtins(
                summarize_logos([body for _, body in records], params.get("maxLogos", 5)))
        if params.get("categorize"):
            result_cat = summarize_categorization(running.categories, self.settings.pipeline.categorization_top_k)
            if result_cat is not None:
                elapsed = int((time.time() - (row.task.started_at or time.time())) * 1000)
                summary["categorization"] = msgspec.to_builtins(result_cat.summary(elapsed))
        duration = last_end(records)
        if upload is not None:
            try:
                stats = await in_thread(upload.finish, f"upload-{row.id}")
            except StorageError as err:
                self.metrics.upload_failures.labels(err.reason).inc()
                raise JobFailed(UPLOAD_FAILED, err.message) from None
            log.info("job %s: media uploaded (%d object(s) as segments closed, %d at the end)", row.id,
                     len(upload.stored), stats.objects)
        else:
            await asyncio.get_running_loop().run_in_executor(
                None, publish, staging, self.media_root / row.id, self.work_root / row.id / "old")
        done = await self._finish(row, "COMPLETED", outputs=list(result.renditions), duration=duration,
                                  summary=summary or None)
        if done is not None:
            log.info("job %s completed: %d segment(s), %.1f s", row.id, done.task.segments, duration or 0)
        await self._cleanup(row.id, keep_media=True)

    async def _fail(self, running: RunningJob, failure: JobFailed) -> None:
        if running.lost:
            return
        log.warning("job %s failed: %s %s", running.row.id, failure.code, failure.message)
        await self._finish(running.row, "FAILED", error_code=failure.code, error_message=failure.message)
        await self._cleanup(running.row.id)

    async def _finish(self, row: JobRow, status: str, **results: Any) -> JobRow | None:
        """The end state and its event, retried until the store takes it (a
        failing store must not lose how a job ended); given up when the node
        drains: the job is still PROCESSING then, and runs again at the next start."""
        name = "video.conversion.completed" if status == "COMPLETED" else "video.conversion.failed"
        delay = 0.5
        while True:
            try:
                done = await self.store(Store.finish_job, row.id, status, lifecycle_events(name, self.public_url),
                                        epoch=row.task.epoch, **results)
                break
            except LeaseLost:  # another node runs the job again: its end is that node's to store
                self.lost([row.id])
                return None
            except Exception as exc:
                if self.draining:
                    raise
                log.error("job %s: end state not stored (%s); retrying in %.1f s", row.id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if done is not None:
            self.metrics.jobs_ended.labels(status).inc()
            self.delivery.wake()
        return done

    async def _cleanup(self, job_id: str, keep_media: bool = False) -> None:
        """An ended job's inputs and staging go; a job that did not complete has no media."""
        def remove() -> None:
            shutil.rmtree(self.work_root / job_id, ignore_errors=True)
            if not keep_media:
                shutil.rmtree(self.media_root / job_id, ignore_errors=True)
        await asyncio.get_running_loop().run_in_executor(None, remove)

    # --- ownership: leases across nodes (services/cluster.py) ------------------------------------

    def held(self) -> dict[str, int]:
        """{job id: epoch} of the jobs this node runs and still believes it owns."""
        return {job_id: r.row.task.epoch for job_id, r in self.running.items() if not r.lost}

    def lost(self, job_ids: list[str]) -> None:
        """Another node claimed these jobs (this node's lease lapsed): stop them here, writing nothing more."""
        for job_id in job_ids:
            running = self.running.get(job_id)
            if running is not None and not running.lost:
                log.warning("job %s: lease lost (another node runs it now); stopping it here", job_id)
                running.lost = True
                running.stop = StopMode.NOW

    # --- drain ----------------------------------------------------------------------------------------

    async def drain(self, timeout: float = 10.0) -> None:
        """SIGTERM: no new jobs; running ones stop where they are and stay
        PROCESSING, so the next start runs them again (none is lost)."""
        self.draining = True
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        runs = [r.task for r in self.running.values() if r.task is not None]
        for running in self.running.values():
            running.stop = StopMode.NOW
        if not runs:
            return
        log.warning("draining: %d running job(s) stop and run again at the next start", len(runs))
        _, pending = await asyncio.wait(runs, timeout=timeout)
        for task in pending:  # e.g. a download in progress: it is started again next time
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
