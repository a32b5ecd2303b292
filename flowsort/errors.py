"""Errors shared by every flowsort package."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad input, missing package).

    The command line prints it without a traceback; the message must say what
    was wrong and, where possible, what to do about it.
    """
