"""Wire schemas: the single source of every JSON shape streamguard emits or
accepts (msgspec Structs, validated on decode, also the source of the
OpenAPI document). Field names follow CONTRACT.md exactly."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType


class _Wire(msgspec.Struct, kw_only=True):
    pass


# --- per-segment record (CONTRACT §3) ------------------------------------

class Violation(_Wire, kw_only=True):
    category: str
    confidence: float
    severity: str


class FlaggedFrame(_Wire, kw_only=True):
    frame_index: int  # index of the sampled frame within its segment
    time: str  # timeline seconds, three decimals
    violations: list[Violation]


class ContentModeration(_Wire, kw_only=True):
    has_unsafe_content: bool
    frames_processed: int
    violations: list[Violation]
    scores: dict[str, float]
    flagged_frames: list[FlaggedFrame]


class LogoBox(_Wire, kw_only=True):
    """A box normalised to 0..1 of the frame."""

    x: float
    y: float
    width: float
    height: float


class LogoHit(_Wire, kw_only=True):
    """One gallery logo seen in a segment, at its best frame."""

    name: str
    logo_id: str
    confidence: float
    bbox: LogoBox
    frame_index: int  # index of the sampled frame within its segment
    time: str  # timeline seconds, three decimals


class LogoDetection(_Wire, kw_only=True):
    has_logo: bool
    logos: list[LogoHit]  # one per distinct logo, highest confidence first, at most max_logos
    frames_processed: int


class CategoryScore(_Wire, kw_only=True):
    name: str
    confidence: float
    primary: bool


class Categorization(_Wire, kw_only=True):
    """A segment's categorization (CONTRACT §3, §6): its frames averaged."""

    primary_category: str
    confidence: float
    categories: list[CategoryScore]  # the primary first, then others >= 0.01, at most topK
    tags: list[str]
    scores: dict[str, float]  # all 20 categories, summing to 1


class CategorizationSummary(_Wire, kw_only=True):
    """Categorization of a whole job or standalone input, in the reference's
    shape (camelCase): every analysed frame averaged."""

    primaryCategory: str
    confidence: float
    categories: list[CategoryScore]
    tags: list[str]
    scores: dict[str, float]
    framesAnalyzed: int
    processingTimeMs: int


class SegmentData(_Wire, kw_only=True):
    segment_index: int
    start_time: str
    end_time: str
    video_url: str
    content_moderation: ContentModeration | None = None
    logo_detection: LogoDetection | None = None
    categorization: Categorization | None = None
    processing_time_ms: str


class TokenUsage(_Wire, kw_only=True):
    input: int
    output: int = 0
    total: int
    video_tokens: int
    text_tokens: int

    @classmethod
    def of(cls, video_tokens: int, text_tokens: int) -> "TokenUsage":
        n = video_tokens + text_tokens
        return cls(input=n, total=n, video_tokens=video_tokens, text_tokens=text_tokens)


class RecordBody(_Wire, kw_only=True):
    status: int
    message: str
    data: SegmentData | None
    token: TokenUsage | None


class SegmentRecord(_Wire, kw_only=True):
    code: str = "200"
    message: str = "SUCCESS"
    task_id: str
    data: RecordBody


# Status codes of data.status (CONTRACT §3).
STATUS_OK = 0
STATUS_ERROR = -1
STATUS_USER_STOPPED = 14
STATUS_NO_DATA = 15
STATUS_CAPACITY = 16
STATUS_NO_BALANCE = 402


def status_record(task_id: str, status: int, message: str) -> SegmentRecord:
    """A record without segment data: -1 and the task-ending statuses."""
    return SegmentRecord(task_id=task_id, data=RecordBody(status=status, message=message, data=None, token=None))


encoder = msgspec.json.Encoder()


def iso(ts: float | None) -> str | None:
    """Wire form of a time: ISO 8601 UTC with a Z."""
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


# --- shared ranges and names: the one home of each (config, CLI and API import them)

# `metadata` is stored with the task and echoed in every event and read: keep it small.
METADATA_MAX_BYTES = 16 * 1024  # JSON-encoded
METADATA_MAX_DEPTH = 32  # the metadata object itself is level 1
METADATA_RULE = f"at most {METADATA_MAX_BYTES} bytes as JSON and {METADATA_MAX_DEPTH} levels deep"


class FieldInvalid(ValueError):
    """A request field breaks a rule the type cannot express (raised in
    __post_init__; msgspec reports it as a ValidationError caused by this)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:  # iterative: the nesting is what is being limited
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if _deeper_than(metadata, METADATA_MAX_DEPTH):
        raise FieldInvalid("metadata", f"metadata must be nested at most {METADATA_MAX_DEPTH} levels deep")
    size = len(msgspec.json.encode(metadata))
    if size > METADATA_MAX_BYTES:
        raise FieldInvalid("metadata", f"metadata must be at most {METADATA_MAX_BYTES} bytes as JSON (got {size})")


def check_unique(field: str, values: list[str]) -> None:
    seen: set[str] = set()
    duplicates: set[str] = set()
    for value in values:
        (duplicates if value in seen else seen).add(value)
    if duplicates:
        raise FieldInvalid(field, f"{field} lists {', '.join(sorted(duplicates)[:5])} more than once")


# The 13 moderation categories of the reference, in its order (analysis/categories.py
# pairs each with its severity and prompts), and the 20 categorization categories
# of CONTRACT §6 (analysis/taxonomy.py: their prompts and tags).
MODERATION_CATEGORY_NAMES: tuple[str, ...] = (
    "nudity_explicit", "sexual_activity", "suggestive_nudity", "lingerie_underwear", "sexy_suggestive",
    "violence", "gore_graphic", "hate_symbols", "drugs_substances", "weapons", "child_safety", "self_harm",
    "harassment")
CATEGORIZATION_NAMES: tuple[str, ...] = (
    "Sports", "Film & TV", "Music & Dance", "Gaming", "Comedy & Memes", "Lifestyle & Vlog", "Travel & Nature",
    "Food & Cooking", "Beauty & Fashion", "Fitness & Health", "Education & How-To", "Science & Technology",
    "News & Politics", "Business & Finance", "Autos & Vehicles", "Pets & Animals", "Kids & Family", "Art & DIY",
    "Talk & Podcasts", "Home & Garden")

Fps = Annotated[int, Meta(ge=1, le=30)]
SegmentSeconds = Annotated[int, Meta(ge=1, le=60)]
Threshold = Annotated[float, Meta(ge=0, le=1)]
MaxLogos = Annotated[int, Meta(ge=1, le=50)]
TopK = Annotated[int, Meta(ge=1, le=len(CATEGORIZATION_NAMES))]
# Per-category thresholds: moderation category -> 0..1 (checked by check_thresholds).
Thresholds = Annotated[dict[str, float], Meta(
    description="per moderation category, a threshold between 0 and 1 that replaces `threshold` for it")]


def check_thresholds(field: str, thresholds: dict[str, float] | None) -> None:
    """Every key a moderation category, every value within 0..1 (a FieldInvalid naming the first wrong one)."""
    for name, value in (thresholds or {}).items():
        if name not in MODERATION_CATEGORY_NAMES:
            raise FieldInvalid(field, f"{field} names an unknown category {name!r} "
                                      f"(one of {', '.join(MODERATION_CATEGORY_NAMES)})")
        lo, hi = bounds(Threshold)
        if isinstance(value, bool) or not lo <= value <= hi:
            raise FieldInvalid(field, f"{field}.{name} must be between {lo:g} and {hi:g}")


def bounds(annotated: Any) -> tuple[Any, Any]:
    """(ge, le) of a range declared above, for parsers that are not msgspec (the CLI)."""
    meta = next(m for m in get_args(annotated)[1:] if isinstance(m, Meta))
    return meta.ge, meta.le


# Rendition names of the contract (CONTRACT §2, §5): the source remux and the
# encoded presets (media/ladder.py), all written by this node.
Rendition = Literal["source", "360p", "480p", "720p", "1080p"]
RENDITIONS: tuple[str, ...] = get_args(Rendition)
# libx264 presets the encoded renditions may use (jobs' ffmpegPreset, scan --x264-preset).
X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
X264_PRESETS: tuple[str, ...] = get_args(X264Preset)

# Live source URL prefixes accepted by POST /v1/streams.
STREAM_SCHEMES = ("rtmp://", "rtmps://", "rtsp://", "rtsps://", "http://", "https://")
StreamUrl = Annotated[str, Meta(
    min_length=1, max_length=4096, pattern="^(" + "|".join(re.escape(s) for s in STREAM_SCHEMES) + ")",
    description="an rtmp://, rtmps://, rtsp://, rtsps:// or http(s):// (HLS) stream URL")]
# Callback and webhook URLs (their addresses are checked by addresses.validate_callback_url).
HttpUrl = Annotated[str, Meta(min_length=1, max_length=4096, pattern="^https?://",
                              description="an http:// or https:// URL")]

# Webhook and callback event names (CONTRACT §2, §4).
StreamEvent = Literal["stream.started", "stream.stopped", "stream.segment", "stream.alert"]
EventName = Literal[
    "stream.started", "stream.stopped", "stream.segment", "stream.alert",
    "video.conversion.started", "video.conversion.completed", "video.conversion.failed",
    "moderation.started", "moderation.completed", "moderation.failed",
    "categorization.started", "categorization.completed", "categorization.failed",
]
STREAM_EVENTS: tuple[str, ...] = get_args(StreamEvent)
EVENTS: tuple[str, ...] = get_args(EventName)

TaskState = Literal["starting", "running", "stopped"]
JobStatus = Literal["PENDING", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
# Events a job sends to its own callbackUrl (besides its stream.segment records).
JOB_EVENTS: tuple[str, ...] = ("video.conversion.started", "video.conversion.completed", "video.conversion.failed")
# libx264's presets (all but placebo), the reference's six among them.
X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
# A job's HLS segments are its moderation segments: 1..10 s (CONTRACT §2).
JobSegmentSeconds = Annotated[int, Meta(ge=1, le=10)]
# Job input URLs: files fetched over http(s) (addresses checked by addresses.check_host).
InputUrl = Annotated[str, Meta(min_length=1, max_length=4096, pattern="^https?://",
                               description="an http:// or https:// URL of a video file")]
DeliveryStatus = Literal["pending", "delivered", "failed"]


# --- HTTP API ----------------------------------------------------------------

class StreamRequest(_Wire, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/streams."""

    url: StreamUrl
    enable_content_moderation: bool = False
    enable_logo_detection: bool = False
    enable_categorization: bool = False
    fps: Fps = 1
    max_logos: MaxLogos = 5
    segment_seconds: SegmentSeconds = 5
    threshold: Threshold = 0.30
    thresholds: Thresholds | None = None
    renditions: Annotated[list[Rendition], Meta(min_length=1, max_length=len(get_args(Rendition)))] = msgspec.field(
        default_factory=lambda: ["source"])
    callback_url: HttpUrl | None = None
    metadata: Annotated[dict[str, Any], Meta(description=METADATA_RULE)] | None = None
    # Frame-level alerts (CONTRACT §4): a sampled frame scoring at or above this for a
    # moderation category sends `stream.alert` at once; absent, no alerts.
    alert_threshold: Annotated[float, Meta(ge=0, le=1, description=(
        "send stream.alert as soon as a sampled frame scores at least this for a moderation category "
        "(needs enable_content_moderation); absent: no alerts"))] | None = None
    alert_cooldown_seconds: Annotated[float, Meta(ge=1, le=3600, description=(
        "at most one alert per category per this many timeline seconds"))] = 10

    def __post_init__(self) -> None:
        if self.alert_threshold is not None and not self.enable_content_moderation:
            raise FieldInvalid("alert_threshold", "alert_threshold needs enable_content_moderation: true")
        check_unique("renditions", self.renditions)
        check_metadata(self.metadata)
        check_thresholds("thresholds", self.thresholds)


class StreamStartedData(_Wire, kw_only=True):
    task_id: str
    message: str = "stream started"


class StreamStarted(_Wire, kw_only=True):
    """Reply of POST /v1/streams (the reference's shape, not the success envelope)."""

    code: str = "200"
    message: str = "SUCCESS"
    data: StreamStartedData


class TaskCounters(_Wire, kw_only=True):
    segments: int
    flagged_segments: int
    tokens: int
    reconnects: int


class StreamTask(_Wire, kw_only=True):
    task_id: str
    state: TaskState
    status: int | None  # final status code once stopped
    message: str | None
    url: str
    playlist_url: str
    counters: TaskCounters
    settings: dict[str, Any]
    metadata: dict[str, Any] | None
    created_at: str
    started_at: str | None
    stopped_at: str | None
    # The node that runs the task (CONTRACT section 7), or ran it last.
    node: str | None = None


class StreamAlert(_Wire, kw_only=True):
    """`data` of a stream.alert event (CONTRACT §4): one sampled frame of a live
    task at or above its alert_threshold for one category, sent before the
    frame's segment closes."""

    task_id: str
    category: str
    confidence: float
    severity: str
    time: str  # timeline seconds, three decimals
    segment_index: int  # of the segment open when the frame was sampled
    frame_url: str  # a JPEG of the whole frame, under /media/


class AlertItem(StreamAlert, kw_only=True):
    """A stored alert as GET /v1/streams/{task_id}/alerts and GET /v1/alerts list
    it: the event's data plus its place in the list (`alert_index`, the
    `after` cursor), its event id and when it was raised."""

    alert_index: int
    eventId: str
    created_at: str


class AlertPage(_Wire, kw_only=True):
    items: list[AlertItem]
    next_after: int  # poll again with after=next_after


class AlertQuery(_Wire, kw_only=True):
    """GET /v1/alerts and /v1/streams/{task_id}/alerts ?after=&limit=: alerts
    with alert_index > after, oldest first."""

    after: Annotated[int, Meta(ge=0, le=2**62)] = 0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


# --- S3 output (CONTRACT §8) ----------------------------------------------------

BucketName = Annotated[str, Meta(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$",
                                 description="an S3 bucket name")]
KeyPrefix = Annotated[str, Meta(max_length=512, pattern=r"^[^\x00-\x1f\\]*$",
                                description="key prefix, e.g. videos/my-video/")]
Credential = Annotated[str, Meta(min_length=1, max_length=256)]
Region = Annotated[str, Meta(max_length=64, pattern=r"^[a-z0-9-]*$")]


class S3Config(_Wire, kw_only=True, forbid_unknown_fields=True):
    """A job's S3-compatible output (`s3Config`) or a project's default
    (PUT /v1/project/storage). `secretKey` is write-only: never shown back."""

    bucket: BucketName
    region: Region | None = None
    endpoint: HttpUrl | None = None  # an S3-compatible store; absent: AWS S3
    prefix: KeyPrefix | None = None
    accessKey: Credential
    secretKey: Credential
    cdnUrl: HttpUrl | None = None  # base URL of every output URL; absent: the S3 URL


class S3ConfigView(_Wire, kw_only=True):
    """A stored S3Config as GET /v1/project shows it: the secret as "***"."""

    bucket: str
    region: str | None
    endpoint: str | None
    prefix: str | None
    accessKey: str
    secretKey: Literal["***"] = "***"
    cdnUrl: str | None


# --- file jobs (CONTRACT §2 "File jobs") ---------------------------------------

DEFAULT_OUTPUT_FORMATS = ("360p", "480p", "720p")


class JobOptions(_Wire, kw_only=True, forbid_unknown_fields=True):
    """Everything a job takes but its input: the fields of POST /v1/jobs/upload's
    form (arrays and objects JSON-encoded there)."""

    outputFormats: Annotated[list[Rendition], Meta(min_length=1, max_length=len(get_args(Rendition)))] = \
        msgspec.field(default_factory=lambda: list(DEFAULT_OUTPUT_FORMATS))
    ffmpegPreset: X264Preset = "fast"
    # `hlsTime` (the reference's name) is accepted as an alias; `segment_seconds` says which applies.
    segmentSeconds: JobSegmentSeconds | UnsetType = UNSET
    hlsTime: JobSegmentSeconds | UnsetType = UNSET
    fps: Fps = 1
    moderate: bool = False
    categorize: bool = False
    detectLogos: bool = False
    maxLogos: MaxLogos = 5
    threshold: Threshold = 0.30
    metadata: Annotated[dict[str, Any], Meta(description=METADATA_RULE)] | None = None
    callbackUrl: HttpUrl | None = None
    # CONTRACT §8: the job's media goes to this bucket (else the project's default, else /media)
    s3Config: S3Config | None = None

    def __post_init__(self) -> None:
        check_unique("outputFormats", self.outputFormats)
        check_metadata(self.metadata)
        if self.segmentSeconds is not UNSET and self.hlsTime is not UNSET and self.segmentSeconds != self.hlsTime:
            raise FieldInvalid("hlsTime", "hlsTime is an alias of segmentSeconds: give one, or the same value")

    @property
    def segment_seconds(self) -> int:
        for value in (self.segmentSeconds, self.hlsTime):
            if value is not UNSET:
                return value  # type: ignore[return-value]
        return 5


class JobRequest(JobOptions, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/jobs."""

    inputUrl: InputUrl


class JobFlaggedFrame(_Wire, kw_only=True):
    frameIndex: int  # over all of the job's sampled frames, in time order
    time: float  # timeline seconds
    segmentIndex: int
    violations: list[Violation]


class JobLogo(_Wire, kw_only=True):
    """One gallery logo seen in a job, at its best frame over the whole job."""

    name: str
    logoId: str
    confidence: float
    bbox: LogoBox
    frameIndex: int  # over all of the job's sampled frames, in time order
    time: float  # timeline seconds
    segmentIndex: int
    segments: int  # segments in which it was seen


class LogoSummary(_Wire, kw_only=True):
    """A job's logo detection over the whole job (its `logoDetection`)."""

    hasLogo: bool
    logos: list[JobLogo]  # highest confidence first, at most maxLogos
    framesAnalyzed: int


class ModerationSummary(_Wire, kw_only=True):
    """The job's verdict in the reference's shape: per category the max score,
    violations at their highest confidence."""

    safe: bool
    violations: list[Violation]
    scores: dict[str, float]
    flaggedFrames: list[JobFlaggedFrame]
    framesAnalyzed: int
    processingTimeMs: int


class Job(_Wire, kw_only=True):
    """The job object (GET /v1/jobs/{id}; `data` of video.conversion.* events, with jobId)."""

    id: str
    projectId: str
    status: JobStatus
    progress: float  # 0..1; moves at least once per segment
    inputUrl: str | None  # null for an upload
    outputFormats: list[Rendition]  # asked for; once COMPLETED, those produced
    outputUrl: str | None
    thumbnailUrl: str | None
    renditionUrls: dict[str, str] | None
    durationSec: float | None
    segmentsCount: int
    moderation: ModerationSummary | None
    categorization: dict[str, Any] | None
    logoDetection: LogoSummary | None
    tokens: TokenUsage
    metadata: dict[str, Any] | None
    errorCode: str | None
    errorMessage: str | None
    createdAt: str
    startedAt: str | None
    completedAt: str | None


T = TypeVar("T")


class Page(_Wire, Generic[T], kw_only=True):
    items: list[T]
    total: int
    page: int
    pageSize: int


class RecordPage(_Wire, Generic[T], kw_only=True):
    """Stored records: items are sent as stored (msgspec.Raw), documented as SegmentRecord."""

    items: list[T]
    next_after: int | None


# --- query strings: decoded into these (api/requests.py decode_query) and documented from them.
# An optional filter is UNSET when absent: "" or "null" are not a value for it.

PageNumber = Annotated[int, Meta(ge=1, le=1_000_000)]
PageSize = Annotated[int, Meta(ge=1, le=100)]


class StreamListQuery(_Wire, kw_only=True):
    """GET /v1/streams?state=&page=&pageSize=."""

    state: TaskState | UnsetType = UNSET
    page: PageNumber = 1
    pageSize: PageSize = 20


class JobListQuery(_Wire, kw_only=True):
    """GET /v1/jobs?status=&page=&pageSize=."""

    status: JobStatus | UnsetType = UNSET
    page: PageNumber = 1
    pageSize: PageSize = 20


class DeliveryListQuery(_Wire, kw_only=True):
    """GET /v1/deliveries?status=&page=&pageSize=."""

    status: DeliveryStatus | UnsetType = UNSET
    page: PageNumber = 1
    pageSize: PageSize = 20


class RecordQuery(_Wire, kw_only=True):
    """GET /v1/streams/{task_id}/records?after=&limit=: records with segment_index > after."""

    after: Annotated[int, Meta(ge=-1, le=2**31)] = -1
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class WebhookView(_Wire, kw_only=True):
    url: str | None
    secret: str
    events: list[EventName]


class ProjectView(_Wire, kw_only=True):
    id: str
    name: str
    webhook: WebhookView
    created_at: str
    # The default S3 output of the project's jobs (PUT /v1/project/storage), secretKey "***".
    storage: S3ConfigView | None = None


class ErrorBody(_Wire, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorEnvelope(_Wire, kw_only=True):
    success: bool = False
    error: ErrorBody
    timestamp: str
    path: str


class Success(_Wire, kw_only=True):
    success: bool = True
    data: Any


class WebhookUpdate(_Wire, kw_only=True, forbid_unknown_fields=True):
    """PUT /v1/project/webhook. url null removes the webhook; events empty or
    absent subscribes to every event."""

    url: HttpUrl | None
    events: Annotated[list[EventName], Meta(max_length=len(EVENTS), description="each event at most once")] = []

    def __post_init__(self) -> None:
        check_unique("events", self.events)


class Delivery(_Wire, kw_only=True):
    id: str
    eventId: str
    event: EventName
    url: str
    taskId: str | None
    status: DeliveryStatus
    attempts: int
    lastStatusCode: int | None
    lastError: str | None
    createdAt: str
    nextAttemptAt: str | None
    deliveredAt: str | None


# --- standalone, synchronous moderation and categorization (CONTRACT §2) -------------------

MaxFrames = Annotated[int, Meta(ge=1, le=16)]
TopK = Annotated[int, Meta(ge=1, le=20)]
MAX_BATCH_IMAGES = 20


class _Moderate(_Wire, kw_only=True, forbid_unknown_fields=True):
    threshold: Threshold = 0.30
    thresholds: Thresholds | None = None
    metadata: Annotated[dict[str, Any], Meta(description=METADATA_RULE)] | None = None

    def __post_init__(self) -> None:
        check_thresholds("thresholds", self.thresholds)


class ModerateImageRequest(_Moderate, kw_only=True, forbid_unknown_fields=True):
    inputUrl: str


class ModerateImagesRequest(_Moderate, kw_only=True, forbid_unknown_fields=True):
    inputUrls: Annotated[list[str], Meta(min_length=1, max_length=MAX_BATCH_IMAGES)]


class ModerateVideoRequest(_Moderate, kw_only=True, forbid_unknown_fields=True):
    inputUrl: str
    maxFrames: MaxFrames = 8


class CategorizeRequest(_Wire, kw_only=True, forbid_unknown_fields=True):
    inputUrl: str
    topK: TopK = 6
    maxFrames: MaxFrames = 8  # video only
    metadata: Annotated[dict[str, Any], Meta(description=METADATA_RULE)] | None = None


class StandaloneFlaggedFrame(_Wire, kw_only=True):
    frameIndex: int  # index among the analysed frames of this input
    violations: list[Violation]


class ModerationBatchItem(_Wire, kw_only=True):
    index: int
    inputUrl: str | None
    safe: bool | None = None
    violations: list[Violation] = msgspec.field(default_factory=list)
    scores: dict[str, float] = msgspec.field(default_factory=dict)
    flaggedFrames: list[StandaloneFlaggedFrame] = msgspec.field(default_factory=list)
    framesAnalyzed: int = 0
    processingTimeMs: int = 0
    errorMessage: str | None = None


class ModerationJob(_Wire, kw_only=True):
    id: str
    status: str  # COMPLETED | FAILED
    inputUrl: str | None
    inputType: str  # image | video
    safe: bool | None
    violations: list[Violation]
    scores: dict[str, float]
    flaggedFrames: list[StandaloneFlaggedFrame]
    framesAnalyzed: int
    processingTimeMs: int
    createdAt: str
    completedAt: str | None
    tokens: int = 0
    batchItems: list[ModerationBatchItem] | None = None
    inputUrls: list[str | None] | None = None
    errorMessage: str | None = None
    metadata: dict[str, Any] | None = None


class CategorizationJob(_Wire, kw_only=True):
    id: str
    status: str
    inputUrl: str
    inputType: str
    primaryCategory: str | None
    confidence: float | None
    categories: list[CategoryScore]
    tags: list[str]
    scores: dict[str, float]
    framesAnalyzed: int
    processingTimeMs: int
    createdAt: str
    completedAt: str | None
    tokens: int = 0
    errorMessage: str | None = None
    metadata: dict[str, Any] | None = None


class StandaloneJobQuery(_Wire, kw_only=True):
    """GET /v1/moderate/jobs and /v1/categorize/jobs ?status=&page=&pageSize=."""

    status: Literal["PROCESSING", "COMPLETED", "FAILED"] | UnsetType = UNSET
    page: PageNumber = 1
    pageSize: PageSize = 20


# --- logo gallery (CONTRACT §6) ---------------------------------------------------

LogoName = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$",
                               description="1 to 200 characters, not starting or ending with a space")]


class LogoAddRequest(_Wire, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/logos as JSON: a reference image by URL for the logo `name`
    (created if new)."""

    name: LogoName
    inputUrl: Annotated[str, Meta(min_length=1, max_length=4096)]


class LogoForm(_Wire, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/logos as multipart: the form values next to the `image` files."""

    name: LogoName


class LogoImage(_Wire, kw_only=True):
    id: str
    createdAt: str


class Logo(_Wire, kw_only=True):
    """A gallery logo: its reference images (each embedded in several views)."""

    id: str
    name: str
    images: list[LogoImage]
    createdAt: str


class LogoListQuery(_Wire, kw_only=True):
    """GET /v1/logos?page=&pageSize=."""

    page: PageNumber = 1
    pageSize: PageSize = 20
