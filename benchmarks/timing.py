"""What every timing benchmark prints beside its numbers: the machine's load average (compare numbers only within
one run, on a quiet machine) and the spread of repeated measurements."""
from __future__ import annotations

import os
import statistics
from collections.abc import Sequence


def load_average() -> str:
    """'load average 0.12 0.30 0.41' (1, 5 and 15 minutes): above the core count, timings are not comparable."""
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"


def spread(values: Sequence[float], unit: str = "", digits: int = 2) -> str:
    """'median (min–max, n = k)' of repeated measurements."""
    med = statistics.median(values)
    return f"{med:.{digits}f}{unit} ({min(values):.{digits}f}–{max(values):.{digits}f}, n = {len(values)})"
