"""Build the fused CPU kernels now, rather than on first use (about a minute, once per machine type).

    python -m adapt.build_kernels        # exit status 1 if they cannot be built

Where the build goes and which flags it uses: :mod:`adapt.fused`.
"""

from __future__ import annotations

import argparse
import sys

from adapt import fused


def main(argv: list[str] | None = None) -> int:
    """Build (or find already built) the kernels for this machine; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m adapt.build_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    if fused.kernels() is None:
        print("the fused CPU kernels are unavailable (ADAPT_FUSED=0, or see the warning above); "
              "adapt uses its PyTorch path", file=sys.stderr)
        return 1
    print(f"fused CPU kernels ready in {fused.build_directory()} ({' '.join(fused.compile_flags())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
