#!/usr/bin/env python
"""Run or validate the Databricks bundle's jobs locally (a developer tool, not the product).

    .venv/bin/python tools/workflow.py validate
    .venv/bin/python tools/workflow.py run nightly [-t dev|prod] [--param k=v] [--only a,b]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localbundle.cli import main

if __name__ == "__main__":
    sys.exit(main())
