"""What every CLI's `main` shares: a person's error becomes one `error: …` line and exit code 2.

The top floor's helper: it knows only research.errors. Anything that is not a UserError is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from research.errors import UserError


def user_errors_exit_2(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI `main(argv) -> int`: a UserError it raises is printed as `error: <message>` on stderr
    and the exit code is 2 (the code argparse gives a bad flag)."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return guarded
