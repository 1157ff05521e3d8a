"""`python -m benchmarks.continual` from the repository root: the benchmark's command line."""

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [REPO_ROOT]:  # the repository's packages first, ahead of any installed copy
    sys.path.insert(0, REPO_ROOT)

from benchmarks.continual.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
