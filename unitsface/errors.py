"""The one exception type for bad input.

Library code raises `UnitsfaceError` with a one-line message that names the problem
(the file, key or value at fault). The CLI turns it into `error: <message>` and a
non-zero exit, never a traceback.
"""


class UnitsfaceError(Exception):
    """A user-facing error: bad input, missing file, invalid config value."""
