#!/usr/bin/env python
"""Entry point: `python launch/grid.py configs/grids/<grid>.yaml [--out DIR] [--parallel K]
[--dry-run] [--only PATTERN] [--report-only] [--train-cmd CMD]`.

Runs every cell of an experiment grid as its own trainer process (resumable: finished cells
are skipped, failed ones retried), then writes results.csv, tables.md and plots/. All logic
lives in `pml_scale.grid`.
"""

import sys

from pml_scale.grid import main

if __name__ == "__main__":
    sys.exit(main())
