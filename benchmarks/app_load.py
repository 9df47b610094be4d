"""Load test of the app as users meet it: several gradio_client clients ranking the same example.

Starts ``app.py`` (the README command, bundled model by default) in a subprocess, then runs
``--clients`` clients in threads for ``--seconds``, each ranking the example photo for the example
captions again and again, and prints how many calls were made, how many failed (by error type) and
the latency percentiles. Identical concurrent requests are the worst case for output files shared
between requests. Everything is bounded: the server gets ``--start-timeout`` seconds to start, each
call ``--call-timeout`` seconds, and the server is stopped at the end whatever happened.

    python -m benchmarks.app_load [--clients 8] [--seconds 60] [--url http://127.0.0.1:7860/]
    python -m benchmarks.app_load --clients 6 --long-clients 2   # beside 2 maximum-size rankings

With ``--long-clients``, that many more clients rank the photo for captions of the maximum total
length (``--long-chars``, default the app's ``MAX_TOTAL_CHARS``), new ones every call, again and
again: the short clients' latency is then what a user waits beside them. The server's peak
resident memory (Linux ``VmHWM``) is printed too.

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

import random

import numpy as np
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cat.jpg"
WORDS = ("a man woman dog cat horse bus plane boat red white small large old young sitting running "
         "standing on in near beside under the street beach table grass field sky water").split()


def long_captions(seed: int, total: int, caption_chars: int = 1000) -> str:
    """``total // caption_chars`` captions of at most ``caption_chars`` each (about that many),
    different for every ``seed`` (so a memo of captions does not answer them)."""
    rng = random.Random(seed)
    captions: list[str] = []
    while len(captions) < total // caption_chars:
        caption = ""
        while len(caption) < caption_chars - 12:
            caption += rng.choice(WORDS) + " "
        captions.append(caption.strip())
    return "\n".join(captions)


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of process ``pid`` so far, in MB (Linux), else NaN."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
                float("nan"))


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
            Client(url, verbose=False, download_files=False)
            return server, url
        except Exception:  # not listening yet
            time.sleep(1.0)
    server.kill()
    raise SystemExit(f"the app did not answer within {timeout:.0f} s")


def run_clients(url: str, clients: int, seconds: float, call_timeout: float, captions: str, downloads: str,
                long_clients: int = 0, long_chars: int = 0):
    """Latencies of the short clients' successful calls, the failures by type and the long
    clients' latencies, over ``seconds`` of load; the clients download the drawings into ``downloads``."""
    latencies: list[float] = []
    long_latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    seeds = iter(range(10**9))

    def one_client(long: bool) -> None:
        client = Client(url, verbose=False, download_files=downloads)
        while time.monotonic() < deadline:
            with lock:
                text = long_captions(next(seeds), long_chars) if long else captions
            start = time.perf_counter()
            try:
                client.submit(handle_file(str(EXAMPLE)), text,
                              api_name="/rank_captions").result(timeout=call_timeout)
                with lock:
                    (long_latencies if long else latencies).append(time.perf_counter() - start)
            except Exception as e:  # what fails is what this benchmark counts
                name = ("long: " if long else "") + type(e).__name__
                with lock:
                    errors[name] += 1
                    examples.setdefault(name, str(e)[:300])

    threads = [threading.Thread(target=one_client, args=(i >= clients,), daemon=True)
               for i in range(clients + long_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + call_timeout + 30)
    return latencies, errors, examples, long_latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--long-clients", type=int, default=0,
                        help="clients sending maximum-size rankings beside the others (default: none)")
    parser.add_argument("--long-chars", type=int,
                        help="total characters of a long client's captions (default: app_logic.MAX_TOTAL_CHARS)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--call-timeout", type=float, default=60.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--checkpoint", help="passed to app.py (default: the bundled model)")
    parser.add_argument("--url", help="load an app already running here instead of starting one")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import app_logic
    from app import EXAMPLE_CAPTIONS

    long_chars = args.long_chars or app_logic.MAX_TOTAL_CHARS

    with tempfile.TemporaryDirectory() as cache_dir:
        server, url = (None, args.url) if args.url else start_app(args.checkpoint, cache_dir, args.start_timeout)
        try:
            Client(url, verbose=False, download_files=cache_dir).predict(
                handle_file(str(EXAMPLE)), EXAMPLE_CAPTIONS, api_name="/rank_captions")  # warm-up, not counted
            latencies, errors, examples, long_latencies = run_clients(
                url, args.clients, args.seconds, args.call_timeout, EXAMPLE_CAPTIONS, cache_dir,
                args.long_clients, long_chars)
        finally:
            peak = peak_rss_mb(server.pid) if server is not None else float("nan")
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
    calls = len(latencies) + len(long_latencies) + sum(errors.values())
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (float("nan"), float("nan"))
    print(f"{args.clients} clients, {args.seconds:.0f} s, ranking {EXAMPLE.name} with "
          f"{len(EXAMPLE_CAPTIONS.splitlines())} captions")
    if args.long_clients:
        print(f"beside {args.long_clients} clients ranking {long_chars:,} characters of captions: "
              f"{len(long_latencies)} answered, median {np.median(long_latencies) if long_latencies else float('nan'):.1f} s")
    print(f"calls {calls}  errors {sum(errors.values())}  short clients' p50 {p50:.3f} s  p95 {p95:.3f} s  "
          f"server peak RSS {peak:.0f} MB")
    for name, count in errors.most_common():
        print(f"  {count} x {name}: {examples[name]}")
    print(f"target: 0 errors and p50 < 1.5 s -> {not errors and p50 < 1.5}")


if __name__ == "__main__":
    main()
