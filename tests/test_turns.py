"""Turn boundaries (apiserver/turns.py): where a prompt may be cut, where a new prompt starts on a
context, the boundaries read from the evaluated token ids, the names of prefixes, the batch sizes
that never leave a batch of one or two tokens, and the prompt tokenizer."""

from __future__ import annotations

import hashlib

from apiserver.model import TEMPLATES
from apiserver.turns import HASH_BYTES, MIN_BATCH, Evaluated, PromptTokenizer, batch_size, prefix_hashes, turn_offsets
from fake_model import SPECIAL_TOKENS, fake_tokens

CHATML = TEMPLATES["chatml"]
MARKERS = CHATML.turn_start
MARKER_IDS = frozenset({SPECIAL_TOKENS["<|im_start|>"]})


def chat(*turns: str, system: str = "Be brief.") -> str:
    messages = [{"role": "system", "content": system}]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return CHATML.render(messages)


def evaluated(prompt: str, start=(0, 0), context: Evaluated | None = None, complete: bool = True) -> Evaluated:
    """The context once prompt was evaluated from start (the fake tokenizer's ids)."""
    return (context or Evaluated()).extended(prompt, turn_offsets(prompt, MARKERS), start, fake_tokens(prompt[start[0]:]),
                            MARKER_IDS, complete)


def test_boundaries_are_where_a_turn_marker_begins():
    prompt = chat("Hi")
    offsets = turn_offsets(prompt, MARKERS)
    assert [prompt[offset:offset + 12] for offset in offsets] == ["<|im_start|>"] * 3
    assert offsets[0] == 0 and prompt[offsets[1]:].startswith("<|im_start|>user")
    phi3 = TEMPLATES["phi3"].render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert len(turn_offsets(phi3, TEMPLATES["phi3"].turn_start)) == 3
    assert turn_offsets("plain text", ()) == []


def test_the_evaluated_ids_give_each_boundary_its_token_count():
    prompt = chat("Hi")
    context = evaluated(prompt)
    offsets = turn_offsets(prompt, MARKERS)
    assert [offset for offset, _ in context.marks] == offsets[1:], "every boundary but the start"
    for offset, n_past in context.marks:
        assert n_past == len(fake_tokens(prompt[:offset]))
    assert context.text == prompt[:offsets[-1]]


def test_a_new_prompt_starts_at_the_longest_boundary_both_share():
    first = chat("Hi", "Hello!", "How are you?")
    context = evaluated(first)
    follow_up = chat("Hi", "Hello!", "How are you?", "Fine.", "Good to hear")
    offsets = turn_offsets(follow_up, MARKERS)
    offset, n_past = context.start_for(follow_up, offsets)
    assert offset == context.marks[-1][0] and follow_up[offset:].startswith("<|im_start|>assistant")
    assert n_past == len(fake_tokens(follow_up[:offset]))
    other = chat("Hi", system="Be long.")
    assert context.start_for(other, turn_offsets(other, MARKERS)) == (0, 0), "the first turn differs"
    same_system = chat("Bye")
    assert context.start_for(same_system, turn_offsets(same_system, MARKERS)) == context.marks[0]


def test_at_least_one_token_is_left_to_evaluate():
    prompt = chat("Hi")
    context = evaluated(prompt)
    cut = prompt[:context.marks[-1][0]]  # the same prompt, ending where the context's last boundary is
    offset, _ = context.start_for(cut, turn_offsets(cut, MARKERS))
    assert offset < len(cut)


def test_a_shared_prefix_that_does_not_end_at_a_boundary_of_the_new_prompt_is_not_used():
    prompt = chat("Hi")
    context = evaluated(prompt)
    # The same text up to the context's first boundary, then no turn marker: the text after that
    # point would tokenize differently alone than as part of the whole.
    glued = prompt[:context.marks[0][0]] + "and more text<|im_start|>user\nHi<|im_end|>\n"
    assert context.start_for(glued, turn_offsets(glued, MARKERS)) == (0, 0)


def test_a_prompt_cut_short_keeps_the_boundaries_it_reached_and_ids_that_disagree_keep_none():
    prompt = chat("Hi", "Hello!", "Again")
    whole = evaluated(prompt)
    ids = fake_tokens(prompt)
    half = Evaluated().extended(prompt, turn_offsets(prompt, MARKERS), (0, 0), ids[:whole.marks[1][1] + 1],
                                MARKER_IDS, complete=False)
    assert half.marks == whole.marks[:2]
    wrong = Evaluated().extended(prompt, turn_offsets(prompt, MARKERS), (0, 0), ids[:-3], MARKER_IDS, complete=True)
    assert wrong == Evaluated(), "a complete evaluation must show every boundary"
    stray = Evaluated().extended(prompt, turn_offsets(prompt, MARKERS), (0, 0), ids + [151644], MARKER_IDS, True)
    assert stray == Evaluated(), "more marker ids than boundaries: the ids are not this text's"


def test_going_on_from_a_boundary_keeps_the_marks_before_it_and_adds_the_new_ones():
    first = chat("Hi")
    context = evaluated(first)
    follow_up = chat("Hi", "Hello!", "More")
    start = context.start_for(follow_up, turn_offsets(follow_up, MARKERS))
    after = evaluated(follow_up, start, context)
    assert after == evaluated(follow_up), "the same marks as an evaluation from the start"
    assert after.up_to(start[0]).marks == context.up_to(start[0]).marks


def test_prefix_names_are_the_hashes_of_each_prefix():
    text = chat("Hi", "Hello!")
    offsets = turn_offsets(text, MARKERS)[1:]
    names = prefix_hashes(text, offsets)
    assert names == [hashlib.blake2b(text[:offset].encode(), digest_size=HASH_BYTES).digest() for offset in offsets]
    assert prefix_hashes(text + "tail", offsets) == names, "a prefix's name depends on the prefix alone"


def test_batch_sizes_never_leave_a_batch_of_one_or_two_tokens():
    for count in range(1, 1200):
        size = batch_size(count, 128)
        assert MIN_BATCH <= size <= 128
        last = count % size or size
        assert count < MIN_BATCH or last >= MIN_BATCH, (count, size)
    assert batch_size(100, 128) == 128 and batch_size(256, 128) == 128, "the configured size wherever it is safe"
    assert batch_size(129, 128) != 128 and batch_size(130, 128) != 128


def test_the_prompt_tokenizer_cuts_off_what_the_tokenizer_puts_first():
    with_bos = PromptTokenizer(lambda text: [1] + fake_tokens(text), "<|im_start|>", 151644, bos=1)
    text = "<|im_start|>user\nHi there<|im_end|>\n"
    assert with_bos.ids(text, from_empty=False) == fake_tokens(text)
    assert with_bos.ids(text, from_empty=True) == [1] + fake_tokens(text)
    plain = PromptTokenizer(fake_tokens, "<|im_start|>", 151644, bos=None)
    assert plain.ids("just words", from_empty=True) == fake_tokens("just words")


def test_a_bos_before_the_prompt_is_not_a_boundary():
    prompt = chat("Hi")
    with_bos = Evaluated().extended(prompt, turn_offsets(prompt, MARKERS), (0, 0), [1] + fake_tokens(prompt),
                                    MARKER_IDS, True, lead=1)
    assert [n_past for _, n_past in with_bos.marks] == [n_past + 1 for _, n_past in evaluated(prompt).marks]
