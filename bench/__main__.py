"""``uv run python -m bench``: see run.py and README.md."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import main

sys.exit(main())
