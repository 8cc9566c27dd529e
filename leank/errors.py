"""The one exception type LeanK raises for user mistakes.

Every message names the problem and the fix in one line, so the CLI can print it
without a traceback.
"""


class LeanKError(ValueError):
    """A user-facing error: bad input, an unsupported model, a missing dependency."""
