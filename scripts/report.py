"""Build figures and summary.md from icsk run folders: ``python scripts/report.py PATH... --out DIR``."""

import sys

from icsk.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
