"""Load test of the app as users meet it: several gradio_client clients ranking the same example.

Starts ``app.py`` (the README command, bundled model by default) in a subprocess, then runs
``--clients`` clients in threads for ``--seconds``, each ranking the example photo for the example
captions again and again, and prints how many calls were made, how many failed (by error type) and
the latency percentiles. Identical concurrent requests are the worst case for output files shared
between requests. Everything is bounded: the server gets ``--start-timeout`` seconds to start, each
call ``--call-timeout`` seconds, and the server is stopped at the end whatever happened.

    python -m benchmarks.app_load [--clients 8] [--seconds 60] [--url http://127.0.0.1:7860/]

Target on 2 CPU cores: 0 errors, p50 < 1.5 s.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cat.jpg"


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(checkpoint: str | None, cache_dir: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on a free port; returns the process and its URL once it answers."""
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port)]
    if checkpoint:
        command += ["--checkpoint", checkpoint]
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "ADAPT_CACHE_DIR": cache_dir},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the app exited with status {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            Client(url, verbose=False)
            return server, url
        except Exception:  # not listening yet
            time.sleep(1.0)
    server.kill()
    raise SystemExit(f"the app did not answer within {timeout:.0f} s")


def run_clients(url: str, clients: int, seconds: float, call_timeout: float, captions: str):
    """Latencies of the successful calls and the failures by type, over ``seconds`` of load."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def one_client() -> None:
        client = Client(url, verbose=False)
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                client.submit(handle_file(str(EXAMPLE)), captions,
                              api_name="/rank_captions").result(timeout=call_timeout)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as e:  # what fails is what this benchmark counts
                name = type(e).__name__
                with lock:
                    errors[name] += 1
                    examples.setdefault(name, str(e)[:300])

    threads = [threading.Thread(target=one_client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + call_timeout + 30)
    return latencies, errors, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--call-timeout", type=float, default=60.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--checkpoint", help="passed to app.py (default: the bundled model)")
    parser.add_argument("--url", help="load an app already running here instead of starting one")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from app import EXAMPLE_CAPTIONS

    with tempfile.TemporaryDirectory() as cache_dir:
        server, url = (None, args.url) if args.url else start_app(args.checkpoint, cache_dir, args.start_timeout)
        try:
            Client(url, verbose=False).predict(handle_file(str(EXAMPLE)), EXAMPLE_CAPTIONS,
                                               api_name="/rank_captions")  # warm-up, not counted
            latencies, errors, examples = run_clients(url, args.clients, args.seconds, args.call_timeout,
                                                      EXAMPLE_CAPTIONS)
        finally:
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
    calls = len(latencies) + sum(errors.values())
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (float("nan"), float("nan"))
    print(f"{args.clients} clients, {args.seconds:.0f} s, ranking {EXAMPLE.name} with "
          f"{len(EXAMPLE_CAPTIONS.splitlines())} captions")
    print(f"calls {calls}  errors {sum(errors.values())}  p50 {p50:.3f} s  p95 {p95:.3f} s")
    for name, count in errors.most_common():
        print(f"  {count} x {name}: {examples[name]}")
    print(f"target: 0 errors and p50 < 1.5 s -> {not errors and p50 < 1.5}")


if __name__ == "__main__":
    main()
