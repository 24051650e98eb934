"""The 2-process tests spawn workers from `fsdp_workers`, which must be importable by name in the children."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
