"""Servers on 127.0.0.1 for the opt-in serving tests (``hf-gpam serve``, ``vllm serve``): started by the test, polled
a bounded number of times, stopped by the test."""

import os
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], port: int, log_path, polls: int = 120, env: dict | None = None) -> subprocess.Popen:
    """Start ``command`` and wait for ``/health`` to answer 200: at most ``polls`` polls, 0.5 s apart."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(polls):
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise AssertionError(f"the server did not come up; its log:\n{open(log_path).read()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


def complete_text(text: str) -> str:
    """``text`` without a trailing U+FFFD: servers' streaming detokenizers hold back a trailing incomplete UTF-8
    sequence (a byte-level token of a tiny model), which ``decode()`` renders as U+FFFD. Served and reference texts
    are compared through this on both sides; the tests compare token ids where the server returns them."""
    return text.rstrip("\ufffd")
