"""The store's error for a row that does not exist.

(``StoreError``, the database cannot be used at all, lives in db.py beside
the code that raises it.)
"""

from __future__ import annotations


class NotFound(LookupError, ValueError):
    """A row the caller asked for does not exist; the message names it ("conversation 56 does not exist").

    Every store method that looks up a row by id or name raises this, never
    KeyError. It is a LookupError, and also a ValueError: a missing row is a
    bad argument, and a caller that checks its arguments and the rows they
    name in one ``except ValueError`` keeps working.
    """
