import sys
from pathlib import Path

# Tests import the flat modules (npo.py, model.py, ...) from the repository root.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
