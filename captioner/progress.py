"""Progress bars: tqdm's (rate, ETA) when asked for and installed, a silent stand-in otherwise."""

from __future__ import annotations

from typing import Any, Protocol


class ProgressBar(Protocol):
    """What callers use of a bar: tqdm's methods of these names, or :class:`_Silent`'s."""

    def update(self, n: int) -> object: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, desc: str | None, enabled: bool, unit: str = "img") -> ProgressBar:
    """A bar over ``total`` units; with ``enabled`` false (or without tqdm) one that shows nothing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            bar: ProgressBar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
            return bar
    return _Silent()
