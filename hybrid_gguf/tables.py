"""Tables that read at 80 columns and stay plain when piped.

On a terminal rich draws its usual box; piped (not a terminal) a table has no vertical
rules, only the header line, so it reads as plain whitespace-aligned text. Commands drop
their least useful columns when the console is narrow (`console.width`, which follows
$COLUMNS when piped), and long names (paths, tensor names) are never broken mid-name.
"""

from __future__ import annotations

from typing import Optional

from rich import box
from rich.console import Console
from rich.table import Table


def new_table(console: Console, title: Optional[str] = None, **kwargs) -> Table:
    kwargs.setdefault("box", box.HEAVY_HEAD if console.is_terminal else box.SIMPLE_HEAD)
    kwargs.setdefault("pad_edge", console.is_terminal)
    kwargs.setdefault("title_justify", "left")
    kwargs.setdefault("collapse_padding", True)
    return Table(title=title, **kwargs)


def narrow(console: Console, width: int = 100) -> bool:
    """Whether the console is narrower than `width` columns."""
    return console.width < width


def fmt_rate(v: Optional[float]) -> str:
    """tokens/s in at most 6 characters: 36240, 707.2, 70.72, 7.072."""
    if v is None:
        return "-"
    if v != v:  # NaN
        return "nan"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"
