"""What a worker starts from: the model it loads itself, in the background while its socket is
already open, or the model, prefix and prompt-reuse setup its zygote prepared before the fork.

Owns Preloaded (what the zygote hands each worker), ModelLoader (the loading thread: sets runner or
error) and the loading's priority rule. Imports settings, protocol, cpu_share, model, pages,
prefix, reuse_setup and engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, NamedTuple

from apiserver import system
from apiserver.cpu_share import CpuShare, watch_cpu_share
from apiserver.engine import ModelRunner
from apiserver.model import CannotLoad, ChatTemplate, choose_template, load_model, running_threads, warm_up
from apiserver.pages import Ranges, populate
from apiserver.prefix import Prefix, evaluate_prefix
from apiserver.protocol import ENV_ZYGOTE_SERVES, SELF_TEST_RECORD, Sentinel
from apiserver.reuse_setup import ReuseSetup, prepare_reuse
from apiserver.settings import Settings

log = logging.getLogger("gpt4all_api")


class Preloaded(NamedTuple):
    """What the zygote hands each worker it forks."""
    model: Any
    template: ChatTemplate
    cpu_share: CpuShare | None
    prefix: Prefix | None  # the system prompt, evaluated
    reuse: ReuseSetup  # the turn markers' ids, and whether saved contexts can be restored
    written_pages: Ranges  # what a generation writes: copied before the worker is ready
    report_pages: bool = False  # tell the zygote, after the request, which pages this worker wrote


def lower_this_thread_priority() -> None:
    """Load at idle priority: a spare loading its model while the active worker generates would slow
    that generation (docs/benchmarks.md has the figure). Linux scopes this to the calling
    thread, so the threads that generate later (started by the serving threads) keep the normal
    priority. Only when the watchdog says another worker is serving (an unprivileged thread cannot
    undo it, and a load nobody is waiting behind should get the whole machine). Never in a forked
    worker: pages it shares with the active worker would make this a priority inversion."""
    system.lower_this_thread_priority()  # where threads have an idle class (Linux): elsewhere, normal


def saves_contexts(settings: Settings) -> bool:
    """Workers that exit after their requests save their contexts for the next ones (prompt_cache),
    into memory files (system.memory_files)."""
    return settings.prompt_cache and settings.restart_after_requests > 0 and system.memory_files()


class ModelLoader(threading.Thread):
    """Loads the model (or takes the zygote's) in the background; then runner or error is set."""

    def __init__(self, settings: Settings, heartbeat: Sentinel, preloaded: Preloaded | None, background: bool,
                 worker: bool):
        super().__init__(name="model-loader", daemon=True)
        self.settings, self.heartbeat, self.preloaded, self.background = settings, heartbeat, preloaded, background
        self.worker = worker  # run by the watchdog
        self.runner: ModelRunner | None = None
        self.error: str | None = None
        self.load_seconds: float | None = None  # None: the zygote loaded it

    def evaluate_ahead(self, model: Any, template: ChatTemplate, reuse: ReuseSetup) -> Prefix | None:
        """The configured system prompt's prefix; without one, a tiny generation, else the first
        request would be the first to touch the weights' pages. Beside a serving worker with one
        thread: two threads of each on two cores wait for each other, and slow the generation most."""
        with running_threads(model, 1 if self.background else model.model.thread_count()):
            prefix = evaluate_prefix(model, self.settings, template, reuse.tokenizer())
            if prefix is None:
                warm_up(model, self.settings, "Hi")
        return prefix

    def run(self) -> None:
        settings = self.settings
        if self.background:
            lower_this_thread_priority()
        try:
            started = time.monotonic()
            if self.preloaded:
                model, template, cpu_share = self.preloaded.model, self.preloaded.template, self.preloaded.cpu_share
                prefix, reuse = self.preloaded.prefix, self.preloaded.reuse
                copied = populate(self.preloaded.written_pages)  # the first request would copy them, slower
                how = (f"forked from the zygote (pre-warmed: {copied / 2**20:.0f} MiB copied in "
                       f"{(time.monotonic() - started) * 1000:.0f} ms), which loaded")
            else:
                model = load_model(settings)
                template, cpu_share = choose_template(settings, settings.model_file), watch_cpu_share(settings)
                self.load_seconds = time.monotonic() - started
                # Where a zygote forks the workers, it runs the self-test, once: a worker that loaded
                # its own model meanwhile serves a few requests at most, and saves nothing.
                entries = self.worker and saves_contexts(settings) and os.environ.get(ENV_ZYGOTE_SERVES) != "1"
                reuse = prepare_reuse(model, settings, template, entries, settings.state_file(SELF_TEST_RECORD))
                prefix = self.evaluate_ahead(model, template, reuse)
                how = f"loaded in {self.load_seconds:.2f}s:"
            self.runner = ModelRunner(model, settings, template, self.heartbeat.touch, cpu_share, prefix, reuse)
            log.info("%s model %s (template %s, n_ctx %d)", how, settings.model_id, template.name, settings.n_ctx)
        except CannotLoad as error:
            self.error = str(error)
        except Exception as error:
            self.error = f"cannot load the model: {error!r}"
