"""Facts about the served model file, as model listings show them: size, SHA-256 digest, modification
time, and the details read from its GGUF header (format, family, parameter size, quantization).

Owns model_description (Ollama's /api/tags entry, and /api/show's model_info), the digest (known for
the embedded model, computed once and kept beside any other file), RFC 3339 times. Imports settings
and model.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from apiserver.model import DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SIZE, read_gguf_metadata
from apiserver.settings import DEFAULT_MODEL_NAME, Settings

log = logging.getLogger("gpt4all_api")

# llama.cpp's general.file_type values, as quantization levels.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16"}


def rfc3339(timestamp: float | None = None) -> str:
    """Now (or timestamp) in local time with its offset, as Ollama writes times."""
    moment = datetime.datetime.fromtimestamp(time.time() if timestamp is None else timestamp).astimezone()
    return moment.isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=4)
def digest_in_memory(path: str, size: int, mtime_ns: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def file_digest(path: Path, size: int, mtime_ns: int, settings: Settings) -> str:
    """The file's SHA-256: known for the embedded model; otherwise computed once and kept in a
    .sha256 file beside it (a fresh worker per answer must not hash 500 MB each time)."""
    if settings.model == DEFAULT_MODEL_NAME and size == DEFAULT_MODEL_SIZE:
        return DEFAULT_MODEL_SHA256
    cache = path.with_name(f".{path.name}.sha256")
    try:
        cached_size, cached_mtime, digest = cache.read_text().split()
        if (int(cached_size), int(cached_mtime)) == (size, mtime_ns):
            return digest
    except (OSError, ValueError):
        pass
    digest = digest_in_memory(str(path), size, mtime_ns)
    try:
        cache.write_text(f"{size} {mtime_ns} {digest}\n")
    except OSError as error:
        log.warning("cannot keep the model's digest in %s (%s): kept in memory only", cache, error)
    return digest


@functools.lru_cache(maxsize=4)
def gguf_header(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """The whole GGUF header, read once per file version and process (a long-lived worker or the
    zygote, whose forked workers inherit it)."""
    return read_gguf_metadata(Path(path), None)


def model_description(settings: Settings, name: str, with_info: bool = False) -> dict[str, Any]:
    """One model as Ollama lists it; with_info adds model_info (the GGUF header's scalar keys) and
    chat_template."""
    path = settings.model_file
    stat = path.stat()
    metadata = gguf_header(str(path), stat.st_size, stat.st_mtime_ns)
    family = str(metadata.get("general.architecture", ""))
    size_label = metadata.get("general.size_label") or parameter_size(metadata.get("general.parameter_count"))
    description: dict[str, Any] = {
        "name": name, "model": name, "modified_at": rfc3339(stat.st_mtime), "size": stat.st_size,
        "digest": file_digest(path, stat.st_size, stat.st_mtime_ns, settings),
        "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else [],
                    "parameter_size": size_label or "", "quantization_level":
                        FILE_TYPES.get(int(metadata.get("general.file_type") or -1), "unknown")}}
    if with_info:
        description["model_info"] = {key: value for key, value in metadata.items()
                                     if value is not None and key != "tokenizer.chat_template"}
        description["chat_template"] = metadata.get("tokenizer.chat_template", "")
    return description


def parameter_size(count: Any) -> str:
    if not isinstance(count, int) or count <= 0:
        return ""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
