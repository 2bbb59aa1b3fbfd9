"""The parts of gpt4all_api.py and watchdog.py, one concern per module, imports pointing one way.

From the bottom: system (the platform seam: what this system offers, and the fallbacks), channel
(the control channel's transport), settings and protocol (the watchdog imports only these, and metrics,
unavailable, cache_store, the prompt cache's saved contexts, and worker_process and zygote_client,
its handles on processes), forking (the zygote's fork loop),
cpu_share, model, then the reuse of evaluated prompts: turns (turn boundaries), kv_state (gpt4all's
native context), cache_entry (a saved context's format), reuse_setup (markers, tokenizer, the
self-test), prompt_cache (a worker's side of the cache), context (what the model's context holds);
correction (constrained generation by correction); engine (generation, knows nothing of HTTP);
preload and zygote (what a worker starts from: its own model, or the zygote's before the fork);
json_schema, json_frames, json_grammar (JSON and a schema followed a character at a time),
json_output and constraints (JSON mode and tool calls held to their grammar); fields and api
(requests, replies, errors, dispatch, the batched token stream), one module per wire protocol
(seed_api, openai_api, ollama_api), routes (the table built from them), http_server (the transport). This file imports nothing, so
`import apiserver.settings` loads only that module.
"""
