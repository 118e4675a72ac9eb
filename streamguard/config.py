"""Settings: one typed object, loaded from TOML, overridden by STREAMGUARD_* env vars.

Precedence (lowest to highest): built-in defaults < config file < environment
< command-line flags. `STREAMGUARD_SERVER__PORT=9000` sets `server.port`:
the double underscore separates the path, so setting names may keep single
underscores (`STREAMGUARD_DELIVERY__ALLOW_PRIVATE=true`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import msgspec
from msgspec import Meta

from .errors import ConfigError
from .schemas import Fps, SegmentSeconds, Threshold, TopK, check_thresholds

ENV_PREFIX = "STREAMGUARD_"

Port = Annotated[int, Meta(ge=0, le=65535)]
PosFloat = Annotated[float, Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    # Public base URL used in video_url/playlist_url; empty = http://host:port.
    public_url: str = ""
    # Log one line per HTTP request (logger streamguard.access), whatever the log level.
    access_log: bool = False


class S3Settings(_Section, kw_only=True):
    """The node's S3-compatible media store (storage.media = "s3"): live
    tasks' media, shared by every node of a cluster. Jobs with their own
    s3Config use that instead."""

    # Empty: AWS S3 (https://s3.<region>.amazonaws.com); else the base URL of an
    # S3-compatible store (MinIO, SeaweedFS, R2 ...), path-style addressing.
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    # Key prefix under which each task's tree goes (<prefix><task id>/master.m3u8).
    prefix: str = ""
    access_key: str = ""
    # The secret key: here, in env STREAMGUARD_STORAGE__S3__SECRET_KEY, or in
    # a file (secret_key_file, e.g. a mounted secret); never logged or shown.
    secret_key: str = ""
    secret_key_file: str = ""
    # Base URL players reach the objects under (a CDN); empty: the S3 URL.
    public_url: str = ""
    # How long one object's upload is retried (exponential backoff) before
    # it counts as failed: a store that goes away for less loses nothing.
    retry_seconds: PosFloat = 60.0
    # Objects larger than this go up in parts of this size (multipart upload).
    multipart_mb: Annotated[int, Meta(ge=5, le=5120)] = 16
    # Objects uploaded at once per task or job.
    concurrency: Annotated[int, Meta(ge=1, le=64)] = 4

    def __post_init__(self) -> None:
        if self.secret_key and self.secret_key_file:
            raise ValueError("storage.s3: give secret_key or secret_key_file, not both")

    def resolved_secret(self) -> str:
        """The secret key, read from secret_key_file when that is set."""
        if self.secret_key_file:
            try:
                return Path(self.secret_key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"storage.s3.secret_key_file: cannot read {self.secret_key_file}: "
                                  f"{exc.strerror or exc}") from None
        return self.secret_key


class StorageSettings(_Section, kw_only=True):
    data_dir: str = "./var"
    # Empty: SQLite under data_dir (one node). postgresql://user:pass@host/db:
    # a PostgreSQL database that several nodes share (CONTRACT section 7).
    database_url: str = ""
    # Where media (segments, playlists, thumbnails) goes: "local" (served under
    # /media from data_dir/media) or "s3" (the [storage.s3] bucket; several
    # nodes can share it). Jobs with an s3Config go to their own bucket either way.
    media: Literal["local", "s3"] = "local"
    s3: S3Settings = msgspec.field(default_factory=S3Settings)
    retention_days: Annotated[float, Meta(gt=0)] = 3.0
    # Live media (segments, playlists) is deleted this many hours after it was
    # written; fractions of an hour are fine (0.25 = 15 minutes).
    media_retention_hours: Annotated[float, Meta(gt=0)] = 72.0
    # Below this many free bytes under data_dir the node takes no new tasks
    # (503), /readyz fails, and running tasks stop writing media (their records
    # go on). 0 disables the floor.
    min_free_bytes: Annotated[int, Meta(ge=0)] = 1 << 30
    # Seconds between media retention sweeps (they run off the event loop).
    sweep_interval_seconds: PosFloat = 60.0

    def __post_init__(self) -> None:
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("storage.database_url must be empty (SQLite) or a postgresql:// URL")
        if self.media == "s3" and not self.s3.bucket:
            raise ValueError("storage.media = \"s3\" needs storage.s3.bucket")


class SecuritySettings(_Section, kw_only=True):
    # The key that encrypts secrets stored in the database (S3 secret keys):
    # a Fernet key (`streamguard keys new-secret-key` prints one), from here,
    # env STREAMGUARD_SECURITY__SECRET_KEY, or secret_key_file. Empty both:
    # <data_dir>/secret.key, created (mode 0600) at first use.
    secret_key: str = ""
    secret_key_file: str = ""
    # Rotation: the keys in use before, still accepted for decrypting; run
    # `streamguard keys rotate-secret-key` to re-encrypt with the current one.
    previous_secret_keys: list[str] = []


class ModelSettings(_Section, kw_only=True):
    # Model bundle directory (manifest.json + ONNX files). Empty = the test
    # bundle under <data_dir>/models/test, built on first use.
    path: str = ""
    # auto = TensorRT -> CUDA -> CPU, whichever this machine can run.
    providers: Literal["auto", "tensorrt", "cuda", "cpu"] = "auto"
    # fp16 on GPU providers (ignored on CPU, where fp16 is slower).
    fp16: bool = True
    # ONNX Runtime intra-op threads on CPU; 0 = auto: every usable core up
    # to 3 cores, one fewer from 4 up (left to decoding); see
    # inference/session.py:cpu_threads_auto for why.
    cpu_threads: Annotated[int, Meta(ge=0)] = 0
    # Let waiting intra-op threads busy-spin: a faster encoder (10-19% on
    # ViT-B/32 int8) for CPU taken from decoding; for inference-only nodes.
    cpu_spin: bool = False
    # Keep each encoder's graph optimised at ONNX Runtime level ALL under
    # <data_dir>/cache/ort (keyed by file sha256, ORT version, provider and
    # CPU kind) and load it from there at the next start.
    save_optimized: bool = True


class InferenceSettings(_Section, kw_only=True):
    # One batcher serves every pipeline in the process: frames from all
    # streams are stacked up to max_batch or until max_wait_ms has passed.
    max_batch: Annotated[int, Meta(ge=1, le=1024)] = 32
    max_wait_ms: Annotated[float, Meta(ge=0, le=10_000)] = 20.0
    # Cap each encoder run at about this many ms (the batch shrinks to the size
    # whose measured run time fits; never below 1 frame). 0 = max_batch always
    # (the default: on CPU small batches cost throughput exactly under load).
    batch_budget_ms: Annotated[float, Meta(ge=0, le=60_000)] = 0.0
    # Run the image encoder through ONNX Runtime IO binding, preparing the next
    # batch (normalise, copy to the device) while the current one runs.
    io_binding: bool = True
    # Reuse a stream's last embedding for a sampled frame that is nearly
    # identical to the last frame it encoded (bound: analysis/reuse.py).
    reuse_duplicates: bool = True


class PipelineSettings(_Section, kw_only=True):
    segment_seconds: SegmentSeconds = 5
    fps: Fps = 1
    threshold: Threshold = 0.30
    # Per moderation category, a threshold that replaces `threshold` for that
    # category (a request's own `thresholds` replace these in turn).
    thresholds: dict[str, float] = msgspec.field(default_factory=dict)
    # Categorization: the most categories listed per result (the primary first).
    categorization_top_k: TopK = 6
    # Seconds to wait for an input to open, and for each read once open.
    open_timeout: PosFloat = 10.0
    read_timeout: PosFloat = 10.0
    # Decoder threads per stream; 1 scales best with many concurrent streams.
    decode_threads: Annotated[int, Meta(ge=0, le=64)] = 1

    def __post_init__(self) -> None:
        check_thresholds("pipeline.thresholds", self.thresholds)


class LiveSettings(_Section, kw_only=True):
    # A task ends with status 15 after this many seconds without video.
    no_data_timeout: PosFloat = 30.0
    # Connect/open timeout for live sources; also bounds how long a stop waits
    # for a source that is still connecting, and the look at an http(s) URL at
    # start (is it a recording?) and before each reconnect (did its playlist end?).
    open_timeout: PosFloat = 5.0
    # Read timeout for live sources; also bounds how long a stop waits for a
    # silent source.
    read_timeout: PosFloat = 5.0
    # Reconnect backoff: doubles from 0.5 s up to this, with jitter.
    reconnect_max_backoff: PosFloat = 5.0
    # An unexpected failure inside a task (media or store write, a bug)
    # restarts its pipeline; this many failures within `failure_window`
    # seconds end the task with status 16, naming the last cause.
    max_failures: Annotated[int, Meta(ge=1, le=100)] = 3
    failure_window: PosFloat = 300.0
    # Live playlists list at most this many seconds of the newest media (a
    # sliding window); never more than storage.media_retention_hours.
    playlist_window_seconds: PosFloat = 21600.0


class LimitsSettings(_Section, kw_only=True):
    # Concurrent live tasks this node accepts; more get 429. A task counts 1 plus
    # 1 per encoded rendition (services/streams.task_weight).
    max_tasks: Annotated[int, Meta(ge=1)] = 32
    # When the oldest frame waiting for inference is older than this, the
    # node sheds its newest task (status 16) instead of letting all fall behind.
    max_backlog_seconds: PosFloat = 10.0
    # SIGTERM: how long tasks get to finish their in-flight segment.
    drain_timeout: PosFloat = 90.0
    # Standalone images with more pixels are refused (400) from their header,
    # before decoding: a decompression bomb costs nothing.
    max_image_pixels: Annotated[int, Meta(ge=1)] = 64_000_000


class SourcesSettings(_Section, kw_only=True):
    # Live source URLs that resolve to loopback, link-local or private
    # addresses are refused (at start and at every reconnect) unless this is
    # true or their network is listed in allowed_networks.
    allow_private: bool = False
    # CIDRs a source may resolve to even though they are private, e.g. a camera LAN.
    allowed_networks: list[str] = []

    def __post_init__(self) -> None:
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"sources.allowed_networks: {cidr!r} is not a network (CIDR)") from None

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allowed_networks)


class DeliverySettings(_Section, kw_only=True):
    # Refuse callback/webhook URLs that resolve to private, loopback or
    # link-local addresses unless this is true.
    allow_private: bool = False
    # Any 2xx within this many seconds is success.
    timeout: PosFloat = 10.0
    # Attempts before a delivery is marked failed; the waits between them grow
    # from retry_base_seconds, doubling up to retry_max_seconds, with jitter
    # (defaults: 20 attempts over about a day).
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 20
    retry_base_seconds: PosFloat = 5.0
    retry_max_seconds: PosFloat = 10800.0
    # Requests in flight at once, across all destinations.
    max_in_flight: Annotated[int, Meta(ge=1, le=10_000)] = 64
    # After a secret rotation the old secret keeps signing for this long.
    secret_grace_seconds: Annotated[float, Meta(ge=0)] = 86400.0


class JobsSettings(_Section, kw_only=True):
    # File jobs (POST /v1/jobs) this node runs at once; the rest wait in the
    # durable queue, oldest first.
    concurrency: Annotated[int, Meta(ge=1, le=64)] = 2
    # POST /v1/jobs/upload: a `video` part larger than this is refused with 413
    # as soon as it passes the limit (it streams to disk, never into memory).
    upload_max_bytes: Annotated[int, Meta(ge=1)] = 2 << 30
    # A job's inputUrl: the download fails (DOWNLOAD_FAILED) past this size, or
    # when the whole download, retries included, takes longer than download_timeout seconds.
    download_max_bytes: Annotated[int, Meta(ge=1)] = 2 << 30
    download_timeout: PosFloat = 600.0


class LogoSettings(_Section, kw_only=True):
    # Logo detection (analysis/logos.py). Every region is one image-encoder
    # pass, billed as video tokens. Coarse pass: squares of the frame's short
    # side (the centre one is the frame's own embedding) and a grid of
    # half-side squares stepped by this fraction of their side; then one
    # refine pass around the best coarse square: refine_steps x refine_steps
    # squares of 0.55 of its side and (refine_steps-1)^2 of 0.75. At 16:9 and
    # the defaults: 17 + 13 = 30 regions per sampled frame (+1 full frame).
    coarse_stride: Annotated[float, Meta(ge=0.25, le=1.0)] = 0.75
    refine_steps: Annotated[int, Meta(ge=0, le=6)] = 3
    # A region shows a logo when the logo wins the softmax against the
    # background set and the gallery's other logos with at least this.
    min_confidence: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    # Frames are kept for the refine pass at most this size (long x short
    # side; larger sources are scaled down, never up).
    max_frame_long_side: Annotated[int, Meta(ge=224, le=7680)] = 1280
    max_frame_short_side: Annotated[int, Meta(ge=224, le=4320)] = 720
    # Reference images per gallery logo, and their size limit (bytes).
    max_images_per_logo: Annotated[int, Meta(ge=1, le=100)] = 20
    max_logos_per_project: Annotated[int, Meta(ge=1, le=10_000)] = 200


class ClusterSettings(_Section, kw_only=True):
    # This node's name among the nodes sharing storage.database_url (shown as
    # `node` on live tasks); empty = the host name. Unique per node.
    node_id: str = ""
    # A node owns each live task and running job it runs through a lease in
    # the database, renewed every third of this; a node that stops renewing
    # (dead, paused, cut off) loses them to another node once it runs out.
    # Only with PostgreSQL: a single node on SQLite owns everything.
    lease_seconds: Annotated[float, Meta(ge=1, le=3600)] = 10.0


class Settings(_Section, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    model: ModelSettings = msgspec.field(default_factory=ModelSettings)
    inference: InferenceSettings = msgspec.field(default_factory=InferenceSettings)
    pipeline: PipelineSettings = msgspec.field(default_factory=PipelineSettings)
    live: LiveSettings = msgspec.field(default_factory=LiveSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    sources: SourcesSettings = msgspec.field(default_factory=SourcesSettings)
    delivery: DeliverySettings = msgspec.field(default_factory=DeliverySettings)
    jobs: JobsSettings = msgspec.field(default_factory=JobsSettings)
    cluster: ClusterSettings = msgspec.field(default_factory=ClusterSettings)
    security: SecuritySettings = msgspec.field(default_factory=SecuritySettings)
    logos: LogoSettings = msgspec.field(default_factory=LogoSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    @property
    def node_id(self) -> str:
        return self.cluster.node_id or socket.gethostname()


def _parse_env_value(raw: str) -> Any:
    """Env values are TOML literals when they parse as one (9000, true, [..]), else strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        if len(path) < 2:
            continue  # not a setting (e.g. STREAMGUARD_CONFIG)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from file + env + explicit overrides, validating every value."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    path = path or environ.get("STREAMGUARD_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data = _merge(data, env_overrides(environ))
    data = _merge(data, overrides or {})
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
