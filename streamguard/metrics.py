"""Prometheus metrics. One registry per runtime (no process-global state),
served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.active_tasks = Gauge("streamguard_active_tasks", "Live stream tasks currently running.", registry=r)
        self.segments = Counter("streamguard_segments_total", "Per-segment records stored, by record status.",
                                ["status"], registry=r)
        self.segment_latency = Histogram(
            "streamguard_segment_latency_seconds",
            "Time from a segment's cut to its record being stored.", buckets=LATENCY_BUCKETS, registry=r)
        self.frames_decoded = Counter("streamguard_frames_decoded_total",
                                      "Video frames decoded by samplers.", registry=r)
        self.frames_sampled = Counter("streamguard_frames_sampled_total",
                                      "Frames sampled for analysis (each one encoded or reused).", registry=r)
        self.frames_reused = Counter(
            "streamguard_frames_reused_total",
            "Sampled frames nearly identical to their stream's last encoded frame, whose embedding they reused "
            "instead of running the image encoder (not billed as video tokens).", registry=r)
        self.batch_size = Histogram("streamguard_inference_batch_size", "Frames per image-encoder run.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inference_seconds = Histogram("streamguard_inference_seconds",
                                           "Wall time of one image-encoder run.", registry=r)
        self.queue_depth = Gauge("streamguard_inference_queue_depth",
                                 "Frames waiting for the image encoder.", registry=r)
        self.record_queue_depth = Gauge("streamguard_record_queue_depth",
                                        "Closed segments waiting for their record to be built.", registry=r)
        self.reconnects = Counter("streamguard_source_reconnects_total",
                                  "Live source (re)connections after a drop or failure, by reason.",
                                  ["reason"], registry=r)
        self.packets_repaired = Counter(
            "streamguard_packets_repaired_total",
            "Source packets repaired instead of failing their segment, by kind: dts (non-increasing decode "
            "timestamp moved forward), pts (moved up to its decode timestamp), dropped (refused by the remux), "
            "jump (timestamp jump absorbed into one continuous timeline).", ["kind"], registry=r)
        self.tasks_ended = Counter("streamguard_tasks_ended_total", "Live tasks ended, by final status.",
                                   ["status"], registry=r)
        self.task_failures = Counter(
            "streamguard_task_failures_total",
            "Unexpected failures inside live tasks (media write, store, internal), by reason; each restarts "
            "the task's pipeline, repeated ones end the task with 16.", ["reason"], registry=r)
        self.ingest_threads = Gauge("streamguard_ingest_threads",
                                    "Live ingest threads alive (one per running task).", registry=r)
        self.prompt_tokens = Counter("streamguard_prompt_tokens_encoded_total",
                                     "Prompt tokens the node encoded for itself (shared prompt embeddings); "
                                     "charged to no tenant.", registry=r)
        self.upload_failures = Counter(
            "streamguard_media_upload_failures_total",
            "Media uploads to S3 storage that failed after their retries, by reason (credentials, bucket, "
            "endpoint, access, refused); a live task's upload is tried again, a job's ends it UPLOAD_FAILED.",
            ["reason"], registry=r)
        self.tasks_shed = Counter("streamguard_tasks_shed_total",
                                  "Tasks shed because inference fell behind or the node drained.",
                                  ["reason"], registry=r)

        self.jobs_submitted = Counter("streamguard_jobs_submitted_total", "File jobs accepted (PENDING).",
                                      registry=r)
        self.jobs_running = Gauge("streamguard_jobs_running", "File jobs running on this node.", registry=r)
        self.jobs_ended = Counter("streamguard_jobs_ended_total",
                                  "File jobs ended, by status: COMPLETED, FAILED, CANCELLED.", ["status"], registry=r)
        # Filled by the scale-out work (task leases across nodes); exported at 0
        # until then so dashboards and alerts over it already have a series.
        self.lease_takeovers = Counter("streamguard_lease_takeovers_total",
                                       "Task leases taken over from another node whose lease expired "
                                       "(filled by the scale-out work; 0 until then).", registry=r)

        self.disk_free_bytes = Gauge("streamguard_disk_free_bytes",
                                     "Free bytes under the data dir at the last retention sweep.", registry=r)
        self.media_deleted_bytes = Counter("streamguard_media_deleted_bytes_total",
                                           "Bytes of live media deleted by retention and low-disk eviction.",
                                           registry=r)

        self.deliveries = Counter("streamguard_deliveries_total",
                                  "Delivery attempts by result: delivered, retry (will try again), failed (gave up).",
                                  ["result"], registry=r)
        self.delivery_attempts = Counter("streamguard_delivery_attempts_total",
                                         "HTTP requests made to deliver records and events.", registry=r)
        self.outbox_depth = Gauge("streamguard_outbox_pending", "Deliveries waiting in the outbox.", registry=r)
        self.outbox_oldest_age = Gauge("streamguard_outbox_oldest_age_seconds",
                                       "Age of the oldest pending delivery.", registry=r)
        self.delivery_latency = Histogram(
            "streamguard_delivery_latency_seconds", "Time from a record or event being stored to its acknowledgement.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600), registry=r)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
