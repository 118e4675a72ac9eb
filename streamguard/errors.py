"""Typed errors. Each carries the wire code and HTTP status it maps to, so the
API layer turns any of them into the error envelope in one place."""

from __future__ import annotations

from typing import Any


class StreamGuardError(Exception):
    code = "STREAMGUARD_INTERNAL"
    http_status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ConfigError(StreamGuardError):
    code = "STREAMGUARD_CONFIG_INVALID"


class InputInvalid(StreamGuardError):
    code = "STREAMGUARD_INPUT_INVALID"
    http_status = 400


class NotLiveSource(InputInvalid):
    """A stream URL that is a recording (a file, a finished playlist) or not
    video at all: well-formed, but not something a live task can run on."""

    http_status = 422


class ModelError(StreamGuardError):
    code = "STREAMGUARD_MODEL_ERROR"
    http_status = 503


class MediaError(StreamGuardError):
    """The input could not be opened or read as video."""

    code = "STREAMGUARD_MEDIA_UNREADABLE"
    http_status = 422


class SourceTimeout(MediaError):
    code = "STREAMGUARD_SOURCE_TIMEOUT"


class DownloadError(StreamGuardError):
    code = "STREAMGUARD_DOWNLOAD_FAILED"
    http_status = 502


class InputUnreachable(StreamGuardError):
    """An input URL (file job, standalone check) could not be fetched."""

    code = "STREAMGUARD_INPUT_UNREACHABLE"
    http_status = 502


class PayloadTooLarge(StreamGuardError):
    code = "STREAMGUARD_PAYLOAD_TOO_LARGE"
    http_status = 413


class Conflict(StreamGuardError):
    code = "STREAMGUARD_CONFLICT"
    http_status = 409


class Unauthorized(StreamGuardError):
    code = "STREAMGUARD_UNAUTHORIZED"
    http_status = 401


class InsufficientBalance(StreamGuardError):
    code = "STREAMGUARD_INSUFFICIENT_BALANCE"
    http_status = 402


class NotFound(StreamGuardError):
    code = "STREAMGUARD_NOT_FOUND"
    http_status = 404


class UnsupportedMediaType(StreamGuardError):
    code = "STREAMGUARD_UNSUPPORTED_MEDIA_TYPE"
    http_status = 415


class FeatureUnavailable(StreamGuardError):
    code = "STREAMGUARD_FEATURE_UNAVAILABLE"
    http_status = 422


class CapacityReached(StreamGuardError):
    code = "STREAMGUARD_CAPACITY_REACHED"
    http_status = 429


class Unavailable(StreamGuardError):
    code = "STREAMGUARD_UNAVAILABLE"
    http_status = 503


class AddressRefused(InputInvalid):
    """A URL resolves to an address the operator's address rules refuse."""

    http_status = 422
