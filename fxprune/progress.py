"""Progress bars, built one way: tqdm's, shown only when asked, closed however the work ends.

>>> with stage_bar(True, 3, "fxprune") as step:      # doctest: +SKIP
...     step("match")

A leaf module (tqdm is imported only when a bar is shown).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def stage_bar(show: bool, total: int, desc: str) -> Iterator[Callable[[str], None]]:
    """A bar of ``total`` named stages; yields ``step(name)``, which advances it (a no-op when hidden)."""
    if not show:
        yield lambda name: None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="stage", leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        yield step
    finally:
        bar.close()
