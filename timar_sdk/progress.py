"""The progress bars of the command-line tools and long library calls (tqdm on stderr)."""
from __future__ import annotations

import sys

# When stderr is a pipe or a log file, tqdm cannot redraw in place: every refresh is written
# out. Refresh at most this often there (tqdm's own `mininterval`), so a log gets a few
# progress lines, not ten a second.
LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`: redrawn live on a terminal, throttled to one refresh every
    LOG_INTERVAL_S seconds when stderr is not one. Pass `disable=True` to hide it."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
