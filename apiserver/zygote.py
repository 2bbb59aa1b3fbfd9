"""The watchdog's zygote (Linux): the model loaded once, the system prompt evaluated, the prompt
reuse set up and the pages a worker writes learned, then a ready worker forked per request.

Owns run_zygote. Imports settings, protocol, forking, cpu_share, model, model_facts, pages,
huge_pages, prefix, reuse_setup and preload.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

from apiserver.cpu_share import watch_cpu_share
from apiserver.forking import serve_fork_requests
from apiserver.huge_pages import collapse_into_huge_pages, move_weights_into_huge_pages
from apiserver.model import CannotLoad, choose_template, load_model, warm_up
from apiserver.model_facts import gguf_header
from apiserver.pages import LearnedPages, probe_written_pages
from apiserver.prefix import evaluate_prefix, pre_warm
from apiserver.preload import Preloaded, saves_contexts
from apiserver.protocol import ENV_ZYGOTE_FD, EXIT_CANNOT_LOAD, SELF_TEST_RECORD
from apiserver.reuse_setup import prepare_reuse
from apiserver.settings import Settings
from apiserver.system import set_process_name

log = logging.getLogger("gpt4all_api")


def run_zygote(settings: Settings, serve: Callable[[Preloaded], int]) -> int:
    """The watchdog's zygote (Linux): load the model once, then fork a ready worker per request.

    A fork costs milliseconds and shares the model's memory, so a fresh worker per request no
    longer pays, or makes the active worker pay, a model load. The zygote never serves and stays
    single-threaded, which keeps fork() safe. It loads at normal priority: at idle priority a steady
    stream of requests would starve it, and it loads once, when the first worker is active. serve
    runs in each forked worker, on what the zygote prepared (gpt4all_api.py: the worker's life).
    """
    channel = socket.socket(fileno=int(os.environ.pop(ENV_ZYGOTE_FD)))
    set_process_name("gpt4all-zygote")
    started = time.monotonic()
    try:
        model = load_model(settings)
    except CannotLoad as error:
        log.critical("%s", error)
        return EXIT_CANNOT_LOAD
    if settings.huge_pages:  # before anything runs on the weights: each fork and exit is cheaper then
        move_weights_into_huge_pages(settings.model_file)
    load_seconds = time.monotonic() - started
    warm_up(model, settings)
    template = choose_template(settings, settings.model_file)
    reuse = prepare_reuse(model, settings, template, saves_contexts(settings), settings.state_file(SELF_TEST_RECORD))
    prefix = evaluate_prefix(model, settings, template, reuse.tokenizer())  # every forked worker starts with it
    written_pages = probe_written_pages(lambda: pre_warm(model, settings, template, prefix))
    if settings.huge_pages:  # the memory every worker starts from: fewer page-table entries to copy and drop
        collapse_into_huge_pages()
    stat = settings.model_file.stat()
    gguf_header(str(settings.model_file), stat.st_size, stat.st_mtime_ns)  # read once; the workers inherit it
    # Keep reading the CPU load, so that a forked worker starts with the thread count it needs.
    cpu_share = watch_cpu_share(settings)
    log.info("zygote: model %s loaded, pid %d", settings.model_id, os.getpid())
    learned = LearnedPages(written_pages)  # and, from the first workers' requests, what a real one writes

    def run_worker() -> int:  # in the forked worker: what the zygote knew at the fork
        return serve(Preloaded(model, template, cpu_share, prefix, reuse, learned.ranges, report_pages=learned.wanted))
    return serve_fork_requests(channel, run_worker, every_half_second=cpu_share.update if cpu_share else None,
                               load_seconds=load_seconds, on_pages=learned.receive)
