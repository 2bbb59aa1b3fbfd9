"""The route table: every wire protocol's routes, in one App.

Owns the list of wire protocol modules; a new API is one new module and one entry in WIRE_PROTOCOLS.
Imports settings, api, the wire protocol modules and metrics_api.
"""

from __future__ import annotations

from apiserver import metrics_api, ollama_api, openai_api, seed_api
from apiserver.api import App
from apiserver.settings import Settings

WIRE_PROTOCOLS = (seed_api, openai_api, ollama_api, metrics_api)  # later modules win a path both declare


def build_app(settings: Settings) -> App:
    routes = [route for protocol in WIRE_PROTOCOLS for route in protocol.routes(settings)]
    return App(settings, routes, not_found_hint=f"try POST {settings.route}, GET /health, /v1/... or /api/...")
