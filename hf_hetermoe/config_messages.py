"""How configuration errors quote what the user wrote: shared by config.py and emulation.py (pure Python).

Lives below both so that neither imports the other for it.
"""

from __future__ import annotations

import reprlib
from typing import Any

# Error messages quote what the user wrote, but never all of it: a YAML alias can make a value recursive or
# exponentially large when printed.
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 8
_short.maxlevel = 3


def show(value: Any) -> str:
    """A short repr of a user-written value (never fails)."""
    try:
        return _short.repr(value)
    except Exception:  # a value whose repr fails is still a mistake to report, not a crash
        return f"<{type(value).__name__}>"


def fail(field_name: str, problem: str, fix: str) -> ValueError:
    """The error of one config field: what is wrong and how to fix it."""
    return ValueError(f"hetermoe config: `{field_name}` {problem}. {fix}")
