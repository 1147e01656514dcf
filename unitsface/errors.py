"""The one exception type for bad input.

Library code raises `UnitsfaceError` with a one-line message that names the problem
(the file, key or value at fault). The CLI turns it into `error: <message>` and a
non-zero exit, never a traceback.
"""

import reprlib
import sys
from collections.abc import Callable


class UnitsfaceError(Exception):
    """A user-facing error: bad input, missing file, invalid config value."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for a one-line error that
    wraps a third-party failure: their messages may span lines or be empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60


def brief(value: object) -> str:
    """A repr bounded in length and depth, for a value read from untrusted data in an error message: a damaged
    file can hold a megabyte-long line or lists nested 50,000 deep (whose plain repr raises RecursionError)."""
    return _BRIEF.repr(value)


def run_script(write: Callable[[], str]) -> int:
    """The exit status of a `python -m unitsface...` helper script: `write()` does the work and returns the path
    it wrote ("wrote PATH", 0), and bad input is one line on stderr (2)."""
    try:
        path = write()
    except (UnitsfaceError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
