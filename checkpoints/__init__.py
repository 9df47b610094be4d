"""The checkpoints bundled with this repository (not part of the installed ``adapt`` library).

``DEFAULT_CHECKPOINT`` is the one home of the bundled model's folder for the app, the training
CLIs, the tests and the benchmarks.
"""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default"
