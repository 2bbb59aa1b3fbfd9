"""Settings: config.ini parsed once into a typed, frozen dataclass; the rotating log files.

Owns the Settings dataclass, the converters that check each value, the key table (section, key,
attribute, converter), load_settings(), and the one helper that opens a rotating log file. Imports
only the standard library: it is a leaf, and watchdog.py may import it.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"  # the embedded default model (model.py)
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class Settings:
    config_file: Path
    # [server]
    host: str = "127.0.0.1"
    port: int = 5000
    route: str = "/gpt4all_api"
    api_key: str = ""
    cors_origins: tuple[str, ...] = ()
    socket_timeout: float = 30.0
    backlog: int = 128
    metrics_public: bool = False
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
    system_prompt_cache: bool = True
    prompt_cache: bool = True
    prompt_cache_mb: int = 256
    huge_pages: bool = True
    model_names: tuple[str, ...] = ("*",)
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
    workers: int = 1
    warm_spare: bool = True
    zygote: str = "auto"  # auto, true or false (zygote_client.choose_process_model)
    poll_interval: float = 0.05
    heartbeat_timeout: float = 60.0
    stop_timeout: float = 30.0
    start_timeout: float = 300.0
    backoff_max: float = 60.0
    healthy_after: float = 60.0
    crash_loop_limit: int = 3
    crash_loop_window: float = 60.0
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

    def state_file(self, name: str, **fields: object) -> Path:
        """A file in state_dir named for our port, so that watchdogs on other ports share the folder."""
        return self.state_dir / name.format(port=self.port, **fields)



def bounded(convert: Callable[[str], Any], minimum: float, inclusive: bool) -> Callable[[str], Any]:
    """A converter whose value must be >= minimum (inclusive) or > minimum."""
    def check(text: str) -> Any:
        value = convert(text)
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError(f"must be {'>=' if inclusive else '>'} {minimum}")
        return value
    return check


def at_least(convert: Callable[[str], Any], minimum: float = 0) -> Callable[[str], Any]:
    return bounded(convert, minimum, inclusive=True)


def greater_than(convert: Callable[[str], Any], minimum: float) -> Callable[[str], Any]:
    return bounded(convert, minimum, inclusive=False)


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def auto_or_boolean(text: str) -> str:
    """"auto", or a boolean spelled as "true" or "false"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return "true" if boolean(text) else "false"
    except ValueError:
        raise ValueError("must be auto, true or false") from None


def one_of(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.strip().lower()
    return check


def url_path(text: str) -> str:
    if not text.startswith("/") or "?" in text:
        raise ValueError("must be a path starting with /")
    return text


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number, 0 to 65535")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


# (section, key, attribute, converter); a path converter is marked with None and resolved
# against the config file's folder.
CONFIG_KEYS = [
    ("server", "host", "host", str),
    ("server", "port", "port", port_number),
    ("server", "route", "route", url_path),
    ("server", "api_key", "api_key", str),
    ("server", "cors_origins", "cors_origins", comma_list),
    ("server", "socket_timeout", "socket_timeout", greater_than(float, 0)),
    ("server", "backlog", "backlog", at_least(int, 1)),
    ("server", "metrics_public", "metrics_public", boolean),
    ("model", "model", "model", str),
    ("model", "model_path", "model_path", None),
    ("model", "allow_download", "allow_download", boolean),
    ("model", "device", "device", str),
    ("model", "n_threads", "n_threads", at_least(int)),
    ("model", "n_ctx", "n_ctx", at_least(int, 64)),
    ("model", "n_batch", "n_batch", at_least(int, 1)),
    ("model", "chat_template", "chat_template", one_of("auto", "chatml", "llama3", "gemma", "phi3", "plain")),
    ("model", "system_prompt", "system_prompt", str),
    ("model", "system_prompt_cache", "system_prompt_cache", boolean),
    ("model", "prompt_cache", "prompt_cache", boolean),
    ("model", "prompt_cache_mb", "prompt_cache_mb", at_least(int, 1)),
    ("model", "huge_pages", "huge_pages", boolean),
    ("model", "model_names", "model_names", comma_list),
    ("generation", "max_tokens", "max_tokens", at_least(int, 1)),
    ("generation", "temperature", "temperature", at_least(float)),
    ("generation", "top_k", "top_k", at_least(int, 1)),
    ("generation", "top_p", "top_p", greater_than(float, 0)),
    ("generation", "min_p", "min_p", at_least(float)),
    ("generation", "repeat_penalty", "repeat_penalty", greater_than(float, 0)),
    ("generation", "repeat_last_n", "repeat_last_n", at_least(int)),
    ("limits", "max_body_bytes", "max_body_bytes", at_least(int, 1)),
    ("limits", "max_tokens", "max_tokens_limit", at_least(int, 1)),
    ("limits", "max_seconds", "max_seconds", greater_than(float, 0)),
    ("limits", "queue_size", "queue_size", at_least(int)),
    ("logging", "log_dir", "log_dir", None),
    ("logging", "log_level", "log_level", one_of("debug", "info", "warning", "error")),
    ("logging", "log_prompts", "log_prompts", boolean),
    ("logging", "log_max_bytes", "log_max_bytes", at_least(int, 1024)),
    ("logging", "log_backup_count", "log_backup_count", at_least(int)),
    ("watchdog", "restart_after_requests", "restart_after_requests", at_least(int)),
    ("watchdog", "workers", "workers", at_least(int, 1)),
    ("watchdog", "warm_spare", "warm_spare", boolean),
    ("watchdog", "zygote", "zygote", auto_or_boolean),
    ("watchdog", "poll_interval", "poll_interval", greater_than(float, 0)),
    ("watchdog", "heartbeat_timeout", "heartbeat_timeout", at_least(float, 1)),
    ("watchdog", "stop_timeout", "stop_timeout", greater_than(float, 0)),
    ("watchdog", "start_timeout", "start_timeout", greater_than(float, 0)),
    ("watchdog", "backoff_max", "backoff_max", at_least(float, 1)),
    ("watchdog", "healthy_after", "healthy_after", at_least(float)),
    ("watchdog", "crash_loop_limit", "crash_loop_limit", at_least(int, 1)),
    ("watchdog", "crash_loop_window", "crash_loop_window", greater_than(float, 0)),
    ("watchdog", "max_rss_mb", "max_rss_mb", at_least(int)),
    ("watchdog", "state_dir", "state_dir", None),
]


def load_settings(config_file: Path, **overrides: Any) -> Settings:
    """Read config.ini; a bad or unknown key raises ValueError naming the file, section and key.
    overrides (from the command line) replace the file's values; None leaves a value alone."""
    config_file = Path(config_file).expanduser().resolve()
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(config_file, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, configparser.Error) as error:
        raise ValueError(f"cannot read config {config_file}: {error}") from None
    known: dict[tuple[str, str], tuple[str, Any]] = {
        (section, key): (attribute, convert) for section, key, attribute, convert in CONFIG_KEYS}
    values: dict[str, Any] = {}
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
    values.update({name: value for name, value in overrides.items() if value is not None})
    return Settings(config_file=config_file, **values)


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """--host and --port, which override [server] host and port (a second instance, a busy port)."""
    parser.add_argument("--host", help="listen on this address instead of [server] host")
    parser.add_argument("--port", type=port_number, help="listen on this port instead of [server] port")




# --------------------------------------------------------------------------------------------
# The embedded default model: six data-only wheels, concatenated in order.


def rotating_log_handler(settings: Settings, filename: str, formatter: logging.Formatter) -> logging.Handler:
    """A rotating writer of log_dir/filename, sized and counted as [logging] says."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        settings.log_dir / filename, maxBytes=settings.log_max_bytes,
        backupCount=settings.log_backup_count, encoding="utf-8")
    handler.setFormatter(formatter)
    return handler


def configure_logging(settings: Settings, filename: str | None) -> None:
    """Log to a rotating file in log_dir (when filename is given) and to stderr.

    A worker under the watchdog logs to stderr only: the watchdog is the single writer of
    logs/server.log, so two workers never rotate the same file.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(formatter)
    if filename:
        handlers.append(rotating_log_handler(settings, filename, formatter))
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
