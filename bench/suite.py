"""The long-context evaluation suite; the same as ``edgemerge bench`` (see its --help).

``python bench/suite.py --quick`` runs Qwen in under 10 minutes on 2 cores; without flags
both models run and the report goes to docs/results.md, the plots to docs/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemerge.evaluation.bench_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
