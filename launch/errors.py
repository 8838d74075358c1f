"""Turn user errors into one line on stderr and exit code 2, instead of a traceback."""

from __future__ import annotations

import functools
import sys

from safe_jax.errors import SafeJaxError


def one_line_errors(prog: str):
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SafeJaxError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap
