"""The one user-error type. The library raises it for bad input; the CLI turns it into a
one-line message and exit code 2, in one place (:func:`normbench.cli.main`)."""


class UserError(ValueError):
    """Bad input from the user: an unknown option value, an unreadable file, an impossible grid.

    Subclasses ValueError so that library callers who catch ValueError keep working.
    """
