"""Atomic text files: what every writer of run directories, manifests and results uses (no torch, so the commands
that only check and list stay fast)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, fsync it and rename it into place: a reader sees the old file or the
    new one, never half of one; on any failure (disk full, read-only) the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """``fig.savefig`` into a temporary sibling renamed into place; on any failure (disk full, an interrupt) the
    temporary file is removed and an earlier ``path`` is left as it was. The figure is closed either way."""
    import matplotlib.pyplot as plt
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # the suffix tells savefig the format
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
