"""Makes ``reference.py`` beside this file importable by the tests (there is no package here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
