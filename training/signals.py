"""Ctrl-C and SIGTERM during training: finish the iteration, save the state, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any

from tqdm import tqdm


class StopOnSignal:
    """Turn the first SIGINT / SIGTERM into a request to stop after the current iteration.

    A second Ctrl-C aborts at once (without saving).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        tqdm.write(f"{self.received}: stopping after this iteration and saving the training state "
                   "(Ctrl-C again to abort without saving)")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
