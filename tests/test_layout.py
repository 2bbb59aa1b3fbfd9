"""The layout's rules (DESIGN.md "Layout"): each module owns one concern and imports only downward;
the watchdog's import closure holds neither gpt4all nor the HTTP server."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# Each module of apiserver/ and what it may import of the package (the order of the layout).
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "system": set(),
    "channel": {"system"},
    "settings": set(),
    "protocol": {"system", "channel"},
    "forking": {"system", "channel", "protocol"},
    "cpu_share": {"system", "settings", "protocol"},
    "model": {"settings", "cpu_share"},
    "prefix": {"settings", "model", "turns"},
    "pages": {"system"},
    "huge_pages": {"system", "pages"},
    "turns": set(),
    "kv_state": {"system"},
    "cache_entry": {"turns"},
    "cache_store": {"protocol"},
    "reuse_setup": {"settings", "model", "model_facts", "kv_state", "turns", "cache_entry"},
    "prompt_cache": {"protocol", "kv_state", "turns", "cache_entry", "reuse_setup"},
    "context": {"settings", "protocol", "model", "prefix", "turns", "reuse_setup", "prompt_cache"},
    "correction": {"model"},
    "engine": {"settings", "protocol", "cpu_share", "model", "prefix", "reuse_setup", "context", "correction"},
    "api": {"settings", "engine"},
    "fields": {"settings", "engine", "api"},
    "seed_api": {"settings", "engine", "api", "fields"},
    "tool_formats": set(),
    "json_schema": set(),
    "json_frames": {"json_schema"},
    "json_grammar": {"json_schema", "json_frames"},
    "json_output": {"json_schema", "json_grammar"},
    "constraints": {"json_schema", "json_grammar", "tool_formats"},
    "model_facts": {"settings", "model"},
    "chat": {"settings", "engine", "api", "tool_formats", "json_output", "constraints"},
    "openai_fields": {"settings", "engine", "api", "fields", "tool_formats", "json_output", "chat"},
    "openai_api": {"settings", "engine", "api", "tool_formats", "chat", "openai_fields"},
    "ollama_api": {"settings", "engine", "api", "fields", "model_facts", "tool_formats", "json_output", "chat"},
    "metrics": {"system"},
    "metrics_api": {"settings", "api", "metrics"},
    "routes": {"settings", "api", "seed_api", "openai_api", "ollama_api", "metrics_api"},
    "http_server": {"engine", "api", "metrics"},
    "unavailable": set(),
    "worker_process": {"system", "channel", "settings", "protocol"},
    "zygote_client": {"system", "channel", "settings", "protocol", "worker_process"},
    "preload": {"system", "settings", "protocol", "cpu_share", "model", "pages", "prefix", "reuse_setup", "engine"},
    "zygote": {"system", "settings", "protocol", "forking", "cpu_share", "model", "model_facts", "pages", "huge_pages",
               "prefix", "reuse_setup", "preload"},
}


def package_imports(path: Path) -> set[str]:
    """The apiserver modules a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "apiserver":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("apiserver."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("apiserver."))
    return found


def test_every_module_is_in_the_layout_and_imports_only_downward():
    modules = {path.stem for path in (REPO / "apiserver").glob("*.py") if path.stem != "__init__"}
    assert modules == set(ALLOWED_IMPORTS), "a module was added or removed: place it in ALLOWED_IMPORTS"
    for name in sorted(modules):
        imported = package_imports(REPO / "apiserver" / f"{name}.py")
        assert imported <= ALLOWED_IMPORTS[name], f"apiserver/{name}.py imports {sorted(imported - ALLOWED_IMPORTS[name])}"


def test_every_module_says_what_it_owns_and_stays_small():
    for path in sorted((REPO / "apiserver").glob("*.py")) + [REPO / "gpt4all_api.py"]:
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no module docstring"
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.name} has {lines} lines: split it by concern"


def test_importing_the_watchdog_loads_neither_gpt4all_nor_the_http_server():
    code = "import json, sys; import watchdog; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                                           capture_output=True, text=True).stdout))
    ours = {name for name in loaded if name.startswith("apiserver.")}
    assert ours == {"apiserver.settings", "apiserver.protocol", "apiserver.unavailable", "apiserver.metrics",
                    "apiserver.cache_store", "apiserver.worker_process", "apiserver.zygote_client",
                    "apiserver.system", "apiserver.channel"}, ours
    assert not {name for name in loaded if name.split(".")[0] in ("gpt4all", "gpt4all_api", "http")}, \
        sorted(name for name in loaded if name.split(".")[0] in ("gpt4all", "gpt4all_api", "http"))
