"""Shared test set-up."""

import os

# OpenMP threads that spin while waiting make torch several times slower when the cores are shared
# (measured: region tests 209 s instead of 55 s on a busy 2-core machine). Must be set before torch
# loads, which is why it lives here, the first module pytest imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
