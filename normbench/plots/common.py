"""What every figure module shares: writing a figure in each requested format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def save_figure(fig, output_dir: str | os.PathLike, stem: str, formats: Iterable[str], dpi: int = 120) -> list[Path]:
    """Write ``fig`` as ``<output_dir>/<stem>.<fmt>`` for each format, close it, return the paths."""
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    plt.close(fig)
    return paths
