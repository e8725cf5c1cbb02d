"""Progress bars for long runs: shown on a terminal, silent otherwise, unless asked."""
from __future__ import annotations

import sys


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, progress: bool | None):
    """A tqdm bar on stderr when ``progress`` is True, or when it is None and stderr is a
    terminal; otherwise an object with the same methods that prints nothing."""
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
