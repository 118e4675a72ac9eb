"""Log hygiene for every line streamguard writes (the daemon's own, aiohttp's
and the access log): secrets never reach a log, and text that came from a
client (URLs, headers, bodies) can not forge log lines or drive a terminal.

- Secrets: the value of an `Authorization` header, bearer tokens, API keys
  (`sg_...`) and webhook secrets (`whsec_...`) are replaced by `[redacted]`,
  wherever they appear (message, arguments, traceback).
- Control characters in a message are escaped (`\\n`, `\\r`, `\\x1b` ...), so a
  record is always one line. Tracebacks keep their line breaks, but every line
  of them is indented: a line that starts at column 0 is always a record's.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

REDACTED = "[redacted]"

# (pattern, text kept before the secret): plain functions as replacements, no
# re templates, so a record logged while the interpreter shuts down still formats.
_SECRETS = (
    # "Authorization: xyz", "authorization=xyz", "'Authorization': 'xyz'" (header dumps, reprs)
    re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*['"]?)[^'"\r\n,}]+"""),
    re.compile(r"(?i)\b(bearer\s+)[^\s'\",}]+"),
    re.compile(r"\b(sg_)[A-Za-z0-9_\-]+"),  # API keys
    re.compile(r"\b(whsec_)[A-Za-z0-9+/=_\-]+"),  # webhook signing secrets
)


def _keep_prefix(m: re.Match[str]) -> str:
    return m.group(1) + REDACTED


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def redact(text: str) -> str:
    for pattern in _SECRETS:
        text = pattern.sub(_keep_prefix, text)
    return text


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def escape_controls(text: str) -> str:
    """One line, whatever the text: control characters as escapes."""
    return _CONTROL.sub(_escape_char, text)


def clean(text: str) -> str:
    return escape_controls(redact(text))


def clean_block(text: str, indent: str = "  ") -> str:
    """A traceback or stack: redacted, control characters escaped but line
    breaks kept, every line indented (so none can pass for a record)."""
    text = _CONTROL_BUT_NEWLINE.sub(_escape_char, redact(text))
    return "\n".join(indent + line for line in text.split("\n"))


class SafeFormatter(logging.Formatter):
    """A Formatter whose every output is redacted and escaped (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg, copy.args = clean(record.getMessage()), None
        copy.exc_info = copy.exc_text = copy.stack_info = None
        text = super().format(copy)
        if record.exc_info:
            text += "\n" + clean_block(self.formatException(record.exc_info))
        elif record.exc_text:
            text += "\n" + clean_block(record.exc_text)
        if record.stack_info:
            text += "\n" + clean_block(self.formatStack(record.stack_info))
        return text


FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int, stream: TextIO = sys.stderr) -> None:
    """The process's logging: one stderr handler with the SafeFormatter. Like
    logging.basicConfig, it leaves logging alone when the root logger already
    has handlers (an embedding application's, pytest's)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
