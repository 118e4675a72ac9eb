"""What every handler reads from a request: the app's keys, the caller (auth
middleware), and JSON bodies and query strings decoded into schemas' Structs
with validation messages in the API's words."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import msgspec
from aiohttp import web

from .envelope import Handler
from ..errors import InputInvalid, Unauthorized, UnsupportedMediaType
from ..runtime import Runtime
from ..schemas import FieldInvalid
from ..store.sqlite import Principal

RUNTIME = web.AppKey("runtime", Runtime)
# builds /openapi.json from the route table (api/app.py), which the resource modules do not import
OPENAPI = web.AppKey("openapi", Callable[[], dict[str, Any]])
PRINCIPAL = "streamguard.principal"


# --- auth --------------------------------------------------------------------

@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer <api key>")
    principal = await request.app[RUNTIME].projects.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    request[PRINCIPAL] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


# --- request decoding ------------------------------------------------------------

def _field_info(struct: type, field: str) -> tuple[Any, Any, dict[str, Any]]:
    """A struct field's msgspec type unwrapped from metadata and `| None`, its
    item type (the same for non-lists) and its JSON-schema extras (e.g. the
    description)."""
    info = msgspec.inspect.type_info(struct)
    t: Any = next((f.type for f in getattr(info, "fields", ()) if f.name == field), None)
    extra: dict[str, Any] = {}
    while True:
        if isinstance(t, msgspec.inspect.Metadata):
            extra, t = {**extra, **(t.extra_json_schema or {})}, t.type
        elif isinstance(t, msgspec.inspect.UnionType):
            t = next((u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)), None)
        else:
            break
    item = t.item_type if isinstance(t, msgspec.inspect.ListType) else t
    while isinstance(item, msgspec.inspect.Metadata):
        extra, item = {**extra, **(item.extra_json_schema or {})}, item.type
    return t, item, extra


def _constraint_message(struct: type, field: str, text: str) -> str | None:
    """A message in the API's words for a range, length, choice or pattern violation."""
    t, item, extra = _field_info(struct, field)
    lo, hi = getattr(item, "ge", None), getattr(item, "le", None)
    if lo is not None and hi is not None and (">=" in text or "<=" in text):
        return f"{field} must be between {lo:g} and {hi:g}"
    shortest, longest = getattr(t, "min_length", None), getattr(t, "max_length", None)
    if longest is not None and "length" in text:
        unit = "characters" if isinstance(t, msgspec.inspect.StrType) else "entries"
        span = f"{shortest} to {longest}" if shortest else f"at most {longest}"
        return f"{field} must have {span} {unit}"
    if isinstance(item, msgspec.inspect.LiteralType) and "Invalid enum value" in text:
        return f"{field} must be one of {', '.join(map(str, item.values))}"
    if "matching regex" in text and "description" in extra:
        return f"{field} must be {extra['description']}"
    return None


def friendly_validation(exc: msgspec.ValidationError, struct: type) -> InputInvalid:
    if isinstance(exc.__cause__, FieldInvalid):  # a schema rule beyond the types (schemas.py)
        return InputInvalid(str(exc.__cause__), details={"field": exc.__cause__.field})
    text = str(exc)
    m = re.search(r"at `\$\.(\w+)", text)
    field = m.group(1) if m else None
    if "missing required field" in text:
        name = re.search(r"`(\w+)`", text)
        what = name.group(1) if name else "a field"
        if field:  # inside an object field (s3Config.accessKey): named in full, the field given
            return InputInvalid(f"{field}.{what} is required", details={"field": field, "reason": text})
        return InputInvalid(f"{what} is required", details={"reason": text})
    message = _constraint_message(struct, field, text) if field else None
    if message:
        return InputInvalid(message, details={"field": field, "reason": text})
    return InputInvalid(text, details={"field": field} if field else {})


async def decode_json(request: web.Request, struct: type) -> Any:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"expected Content-Type: application/json, got {request.content_type or 'none'}")
    body = await request.read()
    try:
        return msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        raise friendly_validation(exc, struct) from None
    except msgspec.DecodeError as exc:
        raise InputInvalid(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InputInvalid("malformed JSON: the body is not valid UTF-8") from None
    except RecursionError:
        raise InputInvalid("malformed JSON: nested too deeply") from None


def decode_query(request: web.Request, struct: type) -> Any:
    """The query string as `struct` (see schemas: the same struct documents it in
    /openapi.json). Unknown names are ignored; of a repeated name the last counts."""
    values = dict(request.query.items())
    try:
        return msgspec.convert(values, struct, strict=False)
    except msgspec.ValidationError as exc:
        raise friendly_validation(exc, struct) from None


def decode_form(fields: dict[str, str], struct: type) -> Any:
    """Multipart form values as `struct`, validated like the JSON body: arrays,
    objects and quoted strings are JSON-encoded; numbers and booleans are read
    from their text; other values are plain text."""
    values: dict[str, Any] = {}
    for name, text in fields.items():
        if text.lstrip()[:1] in ("[", "{", '"'):
            try:
                values[name] = json.loads(text)
            except ValueError as exc:
                raise InputInvalid(f"{name} is not valid JSON: {exc}", details={"field": name}) from None
        else:
            values[name] = text
    try:
        return msgspec.convert(values, struct, strict=False)
    except msgspec.ValidationError as exc:
        raise friendly_validation(exc, struct) from None
