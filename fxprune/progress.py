"""Progress bars, built one way: :func:`progress_bar` wraps an iterable (or counts stages by hand
with ``total=``) and is the identity when progress is off.

>>> list(progress_bar(range(3), False, desc="batches"))
[0, 1, 2]
"""
from __future__ import annotations

from typing import Any, Iterable, Optional


def progress_bar(items: Optional[Iterable] = None, show: bool = True, *, desc: str, unit: str = "it",
                 total: Optional[int] = None, **options: Any) -> Any:
    """``items`` under a tqdm bar that vanishes when done (``leave=False``), or ``items`` itself when
    ``show`` is false. Without ``items``: a bar of ``total`` steps advanced by hand with ``update``
    (``None`` when ``show`` is false). tqdm is imported only when a bar is shown."""
    if not show:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, **options)
