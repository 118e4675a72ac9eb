"""streamguard: self-hosted live video moderation."""

__version__ = "0.1.0"
