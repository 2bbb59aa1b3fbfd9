"""Fleet benchmarks: parallel workers, /metrics under load, and the nginx hop.

    python bench/fleet.py [--rounds N]

workers   through watchdog.py (restart after every request, the defaults), `workers = 2` against
          `workers = 1` in the same run: aggregate tokens/s of four concurrent clients, and the
          latency of one client alone (the lone worker must take every free core).
metrics   GET /metrics latency (median, p99) while a generation runs, `workers = 1`.
nginx     with nginx installed: the nginx configuration of docs/operations.md in front of one watchdog (both
          upstream lines point at it, so both ways meet the same box in the same state), against
          going direct, taking turns: time to first streamed token and total latency.

Results are printed and written to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import PROMPTS, median, percentile, post_generate, run_benches, running_watchdog, stream_chat  # noqa: E402
from conftest import Process, free_port, request, write_config  # noqa: E402

CLIENTS = 4
LONG_TOKENS = 96


def watchdog_with(workdir: Path, name: str, watchdog: dict) -> contextlib.AbstractContextManager[Process]:
    return running_watchdog(write_config(workdir / name, {"watchdog": watchdog}))


def generate(base_url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    started = time.monotonic()
    status, _, body = request(base_url, "POST", "/gpt4all_api", {"prompt": prompt, "temperature": 0,
                                                                  "max_tokens": max_tokens},
                              headers={"Accept": "application/json"}, timeout=300)
    if status != 200:
        raise RuntimeError(f"status {status}: {body[:200]!r}")
    return time.monotonic() - started, json.loads(body)["usage"]["completion_tokens"]


def concurrent_tokens_per_second(base_url: str, requests_each: int) -> float:
    """Four clients, each sending requests back to back: generated tokens / wall time."""
    tokens: list[int] = []

    def client(index: int) -> None:
        for round_index in range(requests_each):
            prompt = f"Count from {index * 100 + round_index} upwards, separated by commas."
            tokens.append(generate(base_url, prompt, LONG_TOKENS)[1])

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(tokens) / (time.monotonic() - started)


def lone_client_latency(base_url: str, rounds: int) -> float:
    times = [post_generate(base_url, prompt)[0] for _ in range(rounds) for prompt in PROMPTS]
    return median(times)


def bench_workers(workdir: Path, rounds: int) -> dict:
    results = {}
    for workers in (1, 2):
        with watchdog_with(workdir, f"workers{workers}", {"workers": workers}) as watchdog:
            for prompt in PROMPTS[:2]:
                post_generate(watchdog.base_url, prompt)  # warm the page cache and the spares
            lone = lone_client_latency(watchdog.base_url, rounds)
            aggregate = concurrent_tokens_per_second(watchdog.base_url, max(2, rounds))
        results[f"workers_{workers}"] = {"lone_client_median_s": lone, "four_clients_tokens_per_s": aggregate}
    one, two = results["workers_1"], results["workers_2"]
    results["four_clients_tokens_per_s_ratio"] = two["four_clients_tokens_per_s"] / one["four_clients_tokens_per_s"]
    results["lone_client_latency_ratio"] = two["lone_client_median_s"] / one["lone_client_median_s"]
    return results


def bench_metrics(workdir: Path, rounds: int) -> dict:
    latencies: list[float] = []
    with watchdog_with(workdir, "metrics", {}) as watchdog:
        for _ in range(rounds):
            done = threading.Event()
            worker = threading.Thread(target=lambda: (generate(watchdog.base_url, "Count from 1 to 200.", 150),
                                                      done.set()))  # noqa: B023 (joined in this iteration)
            worker.start()
            time.sleep(0.5)  # the generation runs
            while not done.is_set():
                started = time.monotonic()
                status, _, _ = request(watchdog.base_url, "GET", "/metrics", timeout=30)
                if status != 200:
                    raise RuntimeError(f"/metrics status {status}")
                if not done.is_set():
                    latencies.append(time.monotonic() - started)
                time.sleep(0.05)
            worker.join()
    return {"scrapes": len(latencies), "median_ms": median(latencies) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000, "max_ms": max(latencies) * 1000}


def nginx_config(upstream_ports: list[int], listen_port: int, tmp: Path) -> str:
    """The documented nginx block (docs/operations.md) on our ports, inside a minimal nginx.conf (as the nginx test does)."""
    from test_nginx_integration import documented_nginx_block, nginx_conf, with_ports  # the test owns the extraction
    return nginx_conf(with_ports(documented_nginx_block(), upstream_ports, listen_port), tmp)


def bench_nginx(workdir: Path, rounds: int) -> dict:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        return {"skipped": "nginx is not installed"}
    with contextlib.ExitStack() as stack:
        box = stack.enter_context(watchdog_with(workdir, "box", {}))
        listen = free_port()
        tmp = workdir / "nginx"
        tmp.mkdir()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_config([box.port, box.port], listen, tmp))
        server = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        stack.callback(lambda: (server.terminate(), server.wait()))
        time.sleep(1.0)
        through = f"http://127.0.0.1:{listen}"
        direct_first, direct_total, nginx_first, nginx_total = [], [], [], []
        for _ in range(rounds):
            for prompt in PROMPTS:
                for base_url, firsts, totals in ((box.base_url, direct_first, direct_total),
                                                 (through, nginx_first, nginx_total)):
                    started = time.monotonic()
                    first, _, _ = stream_chat(base_url, prompt)
                    firsts.append(first)
                    totals.append(time.monotonic() - started)
    return {"direct_first_token_ms": median(direct_first) * 1000, "nginx_first_token_ms": median(nginx_first) * 1000,
            "first_token_delta_ms": (median(nginx_first) - median(direct_first)) * 1000,
            "direct_total_s": median(direct_total), "nginx_total_s": median(nginx_total),
            "total_delta_ms": (median(nginx_total) - median(direct_total)) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["workers", "metrics", "nginx", "all"])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the prompts (default %(default)s)")
    arguments = parser.parse_args()
    run_benches({"workers": bench_workers, "metrics": bench_metrics, "nginx": bench_nginx}, arguments.which,
                arguments.rounds, f"fleet-{arguments.which}")


if __name__ == "__main__":
    main()
