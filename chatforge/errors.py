"""A user's mistake, as opposed to a bug.

ChatforgeError carries one line that names the file/line/field and the reason; the CLI prints it to stderr and
exits 2 instead of showing a traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class ChatforgeError(Exception):
    """A problem with the user's input or environment, described in one line."""

    exit_code = 2
