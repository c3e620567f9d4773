"""Errors that mean "the input was wrong" (a path, a field, a value), as opposed to bugs: the
tools print these as one line (:func:`moe_vision.cli.user_errors`), anything else keeps its
traceback."""
from __future__ import annotations


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class FetchError(OSError):
    """A registry package could not be had (no apt-get or pip, no network, a failed download); the
    message says how to give the file instead."""


# (FloatingPointError: training stopped on a non-finite loss; the message names the step and what to do.)
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, MissingExtra,
               FloatingPointError, FetchError)
