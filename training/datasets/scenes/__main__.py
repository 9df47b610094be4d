"""``python -m training.datasets.scenes``: see the package docstring, or ``--help``."""

import sys

from training.datasets.scenes.writing import main

sys.exit(main())
