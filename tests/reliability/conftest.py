import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))  # demo_helpers

from demo_helpers import small_demo  # noqa: E402, F401  (session fixture)
