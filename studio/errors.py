"""The one exception type a user can cause.

It lives in its own leaf module (not in ``studio.adapters``) so that every layer, the pure
adapter core included, can raise it without importing anything else of ours. The CLI turns it
into a single ``error: ...`` line and exit code 2.
"""


class StudioError(Exception):
    """A problem the user can fix: the message names the file or module and the fix."""
