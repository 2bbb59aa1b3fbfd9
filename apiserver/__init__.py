"""The parts of gpt4all_api.py and watchdog.py, one concern per module, imports pointing one way.

From the bottom: settings and protocol (leaves: the watchdog imports only these), forking (the
zygote's fork loop), cpu_share, model, engine (generation, knows nothing of HTTP), fields and api
(requests, replies, errors, dispatch, the batched token stream), one module per wire protocol
(seed_api, openai_api), routes (the table built from them), http_server (the transport). This file imports nothing, so `import apiserver.settings`
loads only that module.
"""
