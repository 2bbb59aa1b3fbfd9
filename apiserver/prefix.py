"""The configured system prompt, evaluated once ([model] system_prompt_cache), and the pre-warm.

Owns Prefix (the chat template's opening up to the end of [model] system_prompt, and the number of
tokens it evaluated to), prefix_text(), evaluate_prefix() and pre_warm() (a request in small, for
the zygote's page probe). The zygote (or a worker
that loads its own model) evaluates the prefix once; every worker forked from it starts with those
tokens in its model's context (gpt4all keeps them: n_past and the token list), and a prompt that
begins with the prefix's text evaluates only the rest, prompt_model(..., reset_context=False) from
n_past set back to the prefix's end (the engine does that). The prefix ends where a special token
begins the next turn, so the split tokenizes exactly as the whole prompt would: answers are
byte-identical with and without it. Imports settings, model and turns only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from apiserver.model import PROMPT_AS_IS, ChatTemplate
from apiserver.settings import Settings
from apiserver.turns import PromptTokenizer, batch_size

log = logging.getLogger("gpt4all_api")

PRE_WARM_QUESTION = "Hello"  # a short user turn: its evaluation writes what a request's would


@dataclasses.dataclass(frozen=True)
class Prefix:
    text: str
    n_past: int  # tokens in the model's context once the text is evaluated


def prefix_text(template: ChatTemplate, system_prompt: str) -> str:
    """The rendered system turn, or "" where a prompt cannot be split after it: the family merges
    the system prompt into the first user message (gemma), or its turns are not separated by a
    special token (plain), so the split could tokenize differently from the whole."""
    if not system_prompt or template.system_in_first_user or template.name == "plain":
        return ""
    return template.message.format(role=template.roles.get("system", "system"), content=system_prompt)


def evaluate_prefix(model: Any, settings: Settings, template: ChatTemplate,
                    tokenizer: PromptTokenizer | None) -> Prefix | None:
    """Evaluate the configured system prompt's turn into the model's context, in the batch size
    every evaluation uses (turns.batch_size). None: off, no system prompt to cache, no tokenizer
    (then nothing can be cut: reuse_setup.py), or it does not fit the context."""
    text = prefix_text(template, settings.system_prompt) if settings.system_prompt_cache else ""
    if not text or tokenizer is None:
        return None
    model.model._prompt_callback = lambda token_id: True
    model.model.prompt_model(text, PROMPT_AS_IS, lambda token_id, piece: False, n_predict=0,
                             n_batch=batch_size(len(tokenizer.ids(text, from_empty=True)), settings.n_batch),
                             reset_context=True, special=True)
    n_past = model.model.context.n_past
    if n_past <= 0:
        log.warning("the system prompt could not be evaluated ahead (does it fit n_ctx = %d?)", settings.n_ctx)
        return None
    log.info("system prompt evaluated ahead: %d tokens every request that shares it need not evaluate", n_past)
    return Prefix(text, n_past)


def pre_warm(model: Any, settings: Settings, template: ChatTemplate, prefix: Prefix | None) -> None:
    """A request's work in small: a short user turn after the prefix and one sampled token. The
    zygote's page probe (pages.py) runs it to learn which pages a generation writes. The context
    goes back to the prefix."""
    start = prefix.n_past if prefix else 0
    if prefix is not None:
        model.model.context.n_past = start
    model.model._prompt_callback = lambda token_id: True
    model.model.prompt_model(template.render([{"role": "user", "content": PRE_WARM_QUESTION}]), PROMPT_AS_IS,
                             lambda token_id, piece: False, n_predict=1, n_batch=settings.n_batch,
                             reset_context=prefix is None, special=True)
    if prefix is not None:
        model.model.context.n_past = start
