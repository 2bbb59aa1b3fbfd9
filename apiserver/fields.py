"""Request fields: the body parsed (JSON, form or multipart, over the query), each field read and
checked, and the sampling fields every generation route shares.

Owns parse_body_fields, the readers (number, text, flag) that raise a 400 naming the field, and
parse_generation_params. Imports settings, engine (GenerationParams) and api (ApiError, Request).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from typing import Any
from urllib.parse import parse_qsl

from apiserver.api import ApiError, Request
from apiserver.engine import GenerationParams
from apiserver.settings import Settings

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def parse_body_fields(request: Request) -> dict[str, Any]:
    """The request's fields: query parameters, overridden by a JSON, form or multipart body."""
    fields: dict[str, Any] = dict(request.query)
    if request.body_error:
        raise request.body_error
    if not request.body:
        return fields
    content_type = request.headers.get("content-type", "")
    mime = content_type.split(";")[0].strip().lower()
    # curl -d without -H sends a JSON body as a form: accept what is plainly JSON.
    if mime in ("", "application/json") or mime.endswith("+json") or (
            mime == "application/x-www-form-urlencoded" and request.body.lstrip()[:1] == b"{"):
        try:
            document = json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}", "invalid_json") from None
        if not isinstance(document, dict):
            raise ApiError(400, "the JSON body must be an object", "invalid_json")
        fields.update(document)
    elif mime == "application/x-www-form-urlencoded":
        try:
            fields.update(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=True))
        except (UnicodeDecodeError, ValueError) as error:
            raise ApiError(400, f"the form body cannot be parsed: {error}", "invalid_form") from None
    elif mime == "multipart/form-data":
        fields.update(parse_multipart(content_type, request.body))
    else:
        raise ApiError(415, f"unsupported content type {mime!r}: send application/json, "
                            "application/x-www-form-urlencoded or multipart/form-data", "unsupported_media_type")
    return fields


def parse_multipart(content_type: str, body: bytes) -> dict[str, str]:
    """Text fields of a multipart/form-data body (what Postman's form-data sends)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "the multipart body cannot be parsed", "invalid_form")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name:
            payload = part.get_payload(decode=True)
            payload = payload if isinstance(payload, bytes) else b""
            try:
                fields[name] = payload.decode(part.get_content_charset() or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise ApiError(400, f"field {name!r} is not valid text", "invalid_form", name) from None
    return fields


def read_number(fields: dict[str, Any], name: str, kind: type, default: Any, low: float, high: float,
                low_open: bool = False) -> Any:
    """A number field (an int or float, or its text from a query or form) within [low, high]."""
    value = fields.get(name)
    if value is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise ApiError(400, f"'{name}' must be {what}, got {value!r}", "invalid_value", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()) or value != value:
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)}", "invalid_type", name)
    if value < low or value > high or (low_open and value == low):  # big ints compare exactly
        bounds = f"{'above' if low_open else 'at least'} {low} and at most {high}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", "out_of_range", name)
    return kind(value)


def read_text(fields: dict[str, Any], name: str, required: bool = False, default: str | None = None) -> str | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", "missing_field", name)
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, got {json.dumps(value)}", "invalid_type", name)
    if required and not value.strip():
        raise ApiError(400, f"'{name}' must not be empty", "empty_field", name)
    return value


def read_flag(fields: dict[str, Any], name: str, default: bool = False) -> bool:
    value = fields.get(name)
    if value is None:  # absent, or an explicit null
        return default
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)}", "invalid_type", name)
    return value



def parse_generation_params(fields: dict[str, Any], settings: Settings,
                            repeat_penalty: float | None = None) -> GenerationParams:
    """Sampling fields, validated; max_tokens is capped at the [limits] max_tokens. repeat_penalty:
    the default when the request sets none (a wire protocol may derive it from its own fields)."""
    if "temp" in fields and "temperature" not in fields:
        fields = {**fields, "temperature": fields["temp"]}
    max_tokens = read_number(fields, "max_tokens", int, settings.max_tokens, 1, 1 << 31)
    stop = fields.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(item, str) and 0 < len(item) <= MAX_STOP_LENGTH for item in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                            f"of at most {MAX_STOP_LENGTH} characters", "invalid_value", "stop")
    default_penalty = settings.repeat_penalty if repeat_penalty is None else repeat_penalty
    return GenerationParams(
        max_tokens=min(max_tokens, settings.max_tokens_limit),
        temperature=read_number(fields, "temperature", float, settings.temperature, 0.0, 2.0),
        top_k=read_number(fields, "top_k", int, settings.top_k, 1, 1_000_000),
        top_p=read_number(fields, "top_p", float, settings.top_p, 0.0, 1.0, low_open=True),
        min_p=read_number(fields, "min_p", float, settings.min_p, 0.0, 1.0),
        repeat_penalty=read_number(fields, "repeat_penalty", float, default_penalty, 0.0, 10.0, low_open=True),
        repeat_last_n=read_number(fields, "repeat_last_n", int, settings.repeat_last_n, 0, settings.n_ctx),
        stop=tuple(stop),
    )
