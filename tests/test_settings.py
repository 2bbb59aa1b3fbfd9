"""config.ini into Settings: every key documented, bad values named with file, section and key."""

from __future__ import annotations

import configparser
import dataclasses
from pathlib import Path

import pytest

from apiserver import settings as settings_module
from apiserver.settings import Settings, load_settings
from conftest import REPO, write_config

# --------------------------------------------------------------------------------------------
# 1. Settings
# --------------------------------------------------------------------------------------------

PATH_ATTRIBUTES = {"config_file", "model_path", "log_dir", "state_dir"}


def test_committed_config_documents_every_key_with_the_dataclass_default():
    settings = load_settings(REPO / "config.ini")
    for field in dataclasses.fields(Settings):
        if field.name not in PATH_ATTRIBUTES:
            loaded = getattr(settings, field.name)
            if field.name == "log_level":  # the converter lower-cases it; logging takes either case
                loaded = loaded.upper()
            assert loaded == field.default, field.name
    assert settings.model_path == REPO / "models"
    assert settings.log_dir == REPO / "logs"
    assert settings.state_dir == REPO / "run"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "config.ini", encoding="utf-8")
    written = {(section, key) for section in parser.sections() for key in parser[section]}
    assert written == {(section, key) for section, key, _, _ in settings_module.CONFIG_KEYS}


@pytest.mark.parametrize("section, key, value", [
    ("server", "port", "abc"),
    ("server", "route", "no-slash"),
    ("server", "socket_timeout", "0"),
    ("model", "allow_download", "maybe"),
    ("model", "chat_template", "mistral"),
    ("model", "n_ctx", "10"),
    ("generation", "top_p", "0"),
    ("generation", "temperature", "hot"),
    ("limits", "max_seconds", "-1"),
    ("logging", "log_level", "loud"),
])
def test_bad_config_value_names_file_section_and_key(tmp_path, section, key, value):
    config = write_config(tmp_path, {section: {key: value}})
    with pytest.raises(ValueError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert str(config.resolve()) in message
    assert f"[{section}] {key} = {value!r}" in message


def test_unknown_config_key_names_file_section_and_key(tmp_path):
    config = write_config(tmp_path, {"limits": {"max_tokenz": "5"}})
    with pytest.raises(ValueError, match=r"\[limits\] max_tokenz: unknown key") as raised:
        load_settings(config)
    assert str(config.resolve()) in str(raised.value)


def test_unreadable_config_raises_value_error_naming_the_file(tmp_path):
    config = tmp_path / "config.ini"
    config.write_text("[server]\nport = 1\nport = 2\n")
    with pytest.raises(ValueError, match="cannot read config") as raised:
        load_settings(config)
    assert str(config.resolve()) in str(raised.value)


def test_relative_paths_resolve_against_the_config_folder_not_the_working_directory(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "app.ini").write_text("[model]\nmodel = m.gguf\nmodel_path = ../weights\n[logging]\nlog_dir = logs\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../etc/app.ini"))
    assert settings.config_file == folder / "app.ini"
    assert settings.model_path == tmp_path / "weights"
    assert settings.log_dir == folder / "logs"
    assert settings.state_dir == folder / "run"  # not written: the default, also from the config's folder
    assert settings.model_file == tmp_path / "weights" / "m.gguf"


def test_host_and_port_from_the_command_line_override_the_file(tmp_path):
    config = write_config(tmp_path)
    from_file = load_settings(config)
    overridden = load_settings(config, host="0.0.0.0", port=5123)
    assert (overridden.host, overridden.port) == ("0.0.0.0", 5123)
    assert load_settings(config, host=None, port=None) == from_file, "None leaves the file's value"
