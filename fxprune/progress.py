"""Progress bars, built one way: :func:`progress_bar` wraps an iterable (or counts steps by hand with
``total=``) and is the identity when progress is off; :func:`stage_bar` names the stages of one run.

>>> list(progress_bar(range(3), False, desc="batches"))
[0, 1, 2]
>>> with stage_bar(False, 3, "fxprune") as step:
...     step("match")

A leaf module (tqdm is imported only when a bar is shown).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional


def progress_bar(items: Optional[Iterable] = None, show: bool = True, *, desc: str, unit: str = "it",
                 total: Optional[int] = None, **options: Any) -> Any:
    """``items`` under a tqdm bar that vanishes when done (``leave=False``), or ``items`` itself when
    ``show`` is false. Without ``items``: a bar of ``total`` steps advanced by hand with ``update``
    (``None`` when ``show`` is false). tqdm is imported only when a bar is shown."""
    if not show:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, **options)


@contextlib.contextmanager
def stage_bar(show: bool, total: int, desc: str, **options: Any) -> Iterator[Callable[[str], None]]:
    """A bar of ``total`` named stages; yields ``step(name)``, which advances it (a no-op when hidden),
    and closes the bar however the work ends."""
    bar = progress_bar(None, show, desc=desc, unit="stage", total=total, **options)
    if bar is None:
        yield lambda name: None
        return

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        yield step
    finally:
        bar.close()
