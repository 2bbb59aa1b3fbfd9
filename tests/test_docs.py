"""The docs hold together: the README stays short and keeps the two commands (the one CI extracts
after its marker, and the one that installs and starts the service), every relative link in the
README and docs/ resolves, every curl example in docs/api.md names a route the server has, and
docs/configuration.md lists exactly the keys the settings read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apiserver.routes import build_app
from apiserver.settings import CONFIG_KEYS, load_settings
from conftest import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CURL_URL = re.compile(r"https?://127\.0\.0\.1:5000(/[^\s\"'\\?]*)?")
INSTALL_AND_START = ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
                     ".venv/bin/python watchdog.py")


def test_the_readme_is_short_and_keeps_its_two_commands():
    text = README.read_text()
    assert len(text.encode()) <= 20 * 1024, f"README.md is {len(text.encode())} bytes: move detail to docs/"
    block = re.search(r"<!-- test-command -->\n```\n(.+?)\n```", text, re.S)
    assert block and block.group(1) == ("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt "
                                        "&& .venv/bin/python -m pytest")
    assert f"```\n{INSTALL_AND_START}\n```" in text


@pytest.mark.parametrize("page", [README] + PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page: Path):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_every_curl_example_in_the_api_reference_names_a_route(tmp_path):
    app = build_app(load_settings(REPO / "config.ini"))
    text = (REPO / "docs" / "api.md").read_text()
    commands = [line for line in text.replace("\\\n", " ").splitlines() if line.lstrip().startswith("curl ")]
    assert len(commands) >= 10, "docs/api.md shows a request for each route"
    for command in commands:
        paths = [match.group(1) or "/" for match in CURL_URL.finditer(command)]
        assert paths, f"a curl example without the server's address: {command}"
        for path in paths:
            assert app.find_route(path) is not None, f"docs/api.md asks {path}, which no route serves"


def test_the_configuration_page_lists_exactly_the_keys_the_settings_read():
    text = (REPO / "docs" / "configuration.md").read_text()
    documented = set()
    section = None
    for line in text.splitlines():
        heading = re.match(r"## \[(\w+)\]\s*$", line)
        if heading:
            section = heading.group(1)
            continue
        row = re.match(r"\|\s*`(\w+)`\s*\|", line)
        if row and section:
            documented.add((section, row.group(1)))
    known = {(section, key) for section, key, _, _ in CONFIG_KEYS}
    assert documented - known == set(), "docs/configuration.md documents keys that do not exist"
    assert known - documented == set(), "keys missing from docs/configuration.md"
