"""The engine: one generation at a time on the loaded model, with limits, stop strings and a queue.

Owns GenerationParams, Completion, StopScanner and ModelRunner, the one place that calls the model.
Under the watchdog each generation also waits for one of the box's slots (a SlotGate: the worker's
WatchdogLink), and the free cores are divided by the generations running on the box. It knows
nothing of HTTP: it raises its own errors (QueueFull, PromptTooLong, PromptNotUnicode, ClientGone)
and api.py gives each its status. A prompt evaluates only what the model's context does not hold
yet, in batches of three tokens or more (context.py says where it starts and in which batch size).
Imports settings, protocol (SlotRefused), cpu_share, model, prefix, reuse_setup and context.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

from apiserver.context import ModelContext
from apiserver.cpu_share import CpuShare
from apiserver.model import PROMPT_AS_IS, ChatTemplate
from apiserver.prefix import Prefix
from apiserver.protocol import SlotRefused, WatchdogLink
from apiserver.reuse_setup import ReuseSetup
from apiserver.settings import Settings

log = logging.getLogger("gpt4all_api")

CONTEXT_ERROR_PREFIX = "ERROR: The prompt size exceeds"  # what gpt4all answers instead of raising


class EngineError(Exception):
    """A generation that cannot run; api.py turns each kind into a status."""


class QueueFull(EngineError):
    def __init__(self, waiting: int):
        super().__init__(f"{waiting} requests are waiting")
        self.waiting = waiting


class PromptTooLong(EngineError):
    def __init__(self, n_ctx: int):
        super().__init__(f"the prompt does not fit the context window of {n_ctx} tokens")
        self.n_ctx = n_ctx


class PromptNotUnicode(EngineError):
    """The prompt holds a lone surrogate: gpt4all cannot encode it."""


class ClientGone(Exception):
    """The client closed its connection: nobody is left to answer."""


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



@dataclasses.dataclass
class Completion:
    text: str
    finish_reason: str  # stop, length, timeout
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    prompt_seconds: float
    generation_seconds: float
    cached_tokens: int = 0  # prompt tokens already in the context (reused, not evaluated)

    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def timings(self) -> Dict[str, float]:
        speed = self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0
        return {"queue_ms": round(self.queue_seconds * 1000, 1), "prompt_ms": round(self.prompt_seconds * 1000, 1),
                "generation_ms": round(self.generation_seconds * 1000, 1), "tokens_per_second": round(speed, 1)}


class SlotGate(Protocol):
    """The box's generation slots (protocol.WatchdogLink): acquire_slot returns the generations
    running with ours, 0 when still_wanted() turned False first; raises SlotRefused when full."""

    def acquire_slot(self, still_wanted: Callable[[], bool]) -> int: ...
    def release_slot(self) -> None: ...


class Closer(Protocol):
    """Finds where an answer is complete (json_output.JsonCloser): fed the generated text a piece at
    a time, returns the index in it just past the end, or None while the answer goes on."""

    def feed(self, piece: str) -> Optional[int]: ...


class StopScanner:
    """Cuts generated text at the first stop string (or where closer says the answer is complete);
    holds back a tail that may begin a stop string."""

    def __init__(self, stops: Iterable[str], closer: Optional[Closer] = None):
        self.closer = closer
        self.stops = tuple(stop for stop in stops if stop)
        self.longest = max((len(stop) for stop in self.stops), default=0)
        self.text = ""
        self.released = 0  # text[:released] may be shown to the client
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the newly releasable text."""
        start = max(0, len(self.text) - self.longest + 1)
        closed_at = self.closer.feed(piece) if self.closer is not None else None
        self.text += piece
        hits = [index for index in (self.text.find(stop, start) for stop in self.stops) if index >= 0]
        if closed_at is not None:
            hits.append(closed_at)
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


class Generation:
    """One generation's progress, as gpt4all's callbacks see it; its answers say whether to go on."""

    def __init__(self, runner: "ModelRunner", params: GenerationParams, client_alive: Callable[[], bool],
                 on_text: Optional[Callable[[str], None]], closer: Optional[Closer] = None):
        self.runner, self.params, self.client_alive, self.on_text = runner, params, client_alive, on_text
        self.started = time.monotonic()
        self.deadline = self.started + runner.settings.max_seconds
        self.scanner = StopScanner(params.stop, closer)
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, those already in the context
        self.evaluated_ids: List[int] = []  # the prompt tokens evaluated, in order
        self.prompt_stopped = False  # a callback stopped the generation inside its prompt
        self.tokens = 0
        self.first_token_at: Optional[float] = None
        self.finish: Optional[str] = None  # stop, length, timeout
        self.error: Optional[BaseException] = None  # raised once gpt4all returns

    def keep_going(self) -> bool:
        self.runner.heartbeat()
        self.runner.adapt_threads(generating=True)
        if self.finish is None and self.error is None:
            if time.monotonic() > self.deadline:
                self.finish = "timeout"
            elif not self.client_alive():
                self.error = ClientGone()
        return self.finish is None and self.error is None

    def on_prompt_token(self, token_id: int) -> bool:
        self.prompt_tokens += 1
        self.evaluated_ids.append(token_id)
        self.prompt_stopped = not self.keep_going()
        return not self.prompt_stopped

    def on_token(self, token_id: int, piece: str) -> bool:
        # gpt4all swallows exceptions raised here: keep them, stop, re-raise after prompt_model()
        try:
            if token_id == -1 or (self.tokens == 0 and piece.startswith(CONTEXT_ERROR_PREFIX)):
                self.error = PromptTooLong(self.runner.settings.n_ctx)
                return False
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.tokens += 1
            released = self.scanner.feed(piece)
            if released and self.on_text:
                self.on_text(released)
            if self.scanner.stopped:
                self.finish = "stop"
            elif self.tokens >= self.params.max_tokens or (
                    self.prompt_tokens + self.tokens >= self.runner.settings.n_ctx):
                self.finish = "length"
            return self.keep_going()
        except BaseException as error:  # ClientGone from on_text, or a bug: stop the model
            self.error = error
            return False

    def result(self, queued: float) -> Completion:
        """After prompt_model(): the error it stopped on, or the Completion (the held-back tail sent)."""
        if self.error is not None:
            raise self.error
        rest = self.scanner.flush()
        if rest and self.on_text:
            self.on_text(rest)
        finished = time.monotonic()
        first_token = self.first_token_at or finished
        return Completion(text=self.scanner.text, finish_reason=self.finish or "stop",
                          prompt_tokens=self.prompt_tokens, completion_tokens=self.tokens,
                          cached_tokens=self.cached_tokens,
                          queue_seconds=self.started - queued, prompt_seconds=first_token - self.started,
                          generation_seconds=finished - first_token)


class ModelRunner:
    """Owns the model: one generation at a time, at most queue_size waiting, limits through the callback."""

    def __init__(self, model: Any, settings: Settings, template: ChatTemplate, heartbeat: Callable[[], None],
                 cpu_share: Optional[CpuShare] = None, prefix: Optional[Prefix] = None,
                 reuse: ReuseSetup = ReuseSetup()):
        self.model, self.settings, self.template, self.heartbeat = model, settings, template, heartbeat
        self._generation = threading.Lock()
        self._counters = threading.Lock()
        self.admitted = 0  # running plus waiting
        self.busy = False
        self.completed = 0
        self.cpu_share = cpu_share
        self.threads = model.model.thread_count()
        self.gate: Optional[SlotGate] = None  # under the watchdog: the box's slots
        self.running_on_box = 1  # generations running on the box: the free cores are divided by it
        self.context = ModelContext(model, settings, template, prefix, reuse)  # what it holds, where prompts start

    def set_running_on_box(self, running: int) -> None:
        """The watchdog says how many generations run now; the next token uses the new share."""
        self.running_on_box = max(1, running)

    def adapt_threads_when_idle(self) -> None:
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
            free = self.cpu_share.update(generating)
            running = self.running_on_box if self.busy else 1
            threads = max(1, free // running)
            if threads != self.threads:
                self.model.model.set_thread_count(threads)
                log.info("generating on %d of %d cores: other programs keep %.1f cores busy, %d generation%s "
                         "on this box", threads, len(self.cpu_share.cpus), self.cpu_share.others, running,
                         "" if running == 1 else "s at once")
                self.threads = threads
        except Exception:  # inside gpt4all's callback an exception would vanish: log it, stop adapting
            log.exception("cannot adapt the thread count; keeping %d threads", self.threads)
            self.cpu_share = None

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - 1)

    def complete(self, prompt: str, params: GenerationParams, client_alive: Callable[[], bool],
                 on_text: Optional[Callable[[str], None]] = None, on_admitted: Callable[[], None] = lambda: None,
                 closer: Optional[Closer] = None) -> Completion:
        """Queue, then run one generation; on_text receives the answer as it grows (stop strings
        already cut). on_admitted runs once the request holds a place in the queue; closer, when
        given, ends the answer where it says the answer is complete."""
        queued = time.monotonic()
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptNotUnicode() from None
        with self._counters:
            if self.admitted > self.settings.queue_size:
                raise QueueFull(self.waiting)
            self.admitted += 1
        try:
            on_admitted()
            while not self._generation.acquire(timeout=0.2):
                if not client_alive():
                    raise ClientGone()
            try:
                self.wait_for_slot(client_alive)
                try:
                    self.busy = True
                    return self._run(prompt, Generation(self, params, client_alive, on_text, closer), queued)
                finally:
                    self.busy = False
                    if self.gate is not None:
                        self.gate.release_slot()
            finally:
                self._generation.release()
        finally:
            with self._counters:
                self.admitted -= 1

    def wait_for_slot(self, client_alive: Callable[[], bool]) -> None:
        """Under the watchdog: wait for one of the box's generation slots (queue_size waiting)."""
        if self.gate is None:
            return
        try:
            running = self.gate.acquire_slot(client_alive)
        except SlotRefused:
            raise QueueFull(self.settings.queue_size) from None
        if not running:
            raise ClientGone()
        self.set_running_on_box(running)

    def attach_cache(self, link: WatchdogLink) -> None:
        self.context.attach_cache(link)

    def exit_after_this(self) -> None:
        self.context.exit_after_this()

    def save_context(self) -> None:
        """Before the worker exits: its context, for the workers after it."""
        with self._generation:
            self.context.save()

    def _run(self, prompt: str, generation: Generation, queued: float) -> Completion:
        # gpt4all 2.8.2: GPT4All.generate() tokenizes with special=False, which spells the template's
        # markers out as text; the low-level prompt_model() parses them as the special tokens they are.
        # _prompt_callback is called once per prompt token.
        params, context = generation.params, self.context
        offsets = context.boundaries(prompt)
        start = context.start_for(prompt, offsets)
        generation.prompt_tokens = generation.cached_tokens = start[1]  # usage: the whole prompt
        self.model.model._prompt_callback = generation.on_prompt_token
        self.adapt_threads()
        if self.cpu_share is not None:
            self.cpu_share.begin_generation()
        try:
            self.model.model.prompt_model(
                prompt[start[0]:], PROMPT_AS_IS, generation.on_token, n_predict=params.max_tokens,
                temp=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                repeat_penalty=params.repeat_penalty, repeat_last_n=params.repeat_last_n,
                n_batch=context.batch_for(prompt[start[0]:], from_empty=not start[1]), reset_context=not start[1],
                special=True)
        finally:
            context.evaluated_from(prompt, offsets, start, generation.evaluated_ids, not generation.prompt_stopped,
                                   shifted=generation.prompt_tokens + generation.tokens >= self.settings.n_ctx - 1)
        completion = generation.result(queued)
        self.completed += 1
        return completion
