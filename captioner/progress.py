"""Progress bars: tqdm's (rate, ETA) when asked for and installed, a silent stand-in otherwise."""

from __future__ import annotations


class _Silent:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kwargs) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, desc: str | None, enabled: bool, unit: str = "img"):
    """A bar over ``total`` units; with ``enabled`` false (or without tqdm) one that shows nothing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return _Silent()
