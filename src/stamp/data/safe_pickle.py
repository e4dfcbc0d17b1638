"""Loading the REFER ``.p`` files without ever executing code from them.

A pickle can name any importable callable and have it called while loading (``os.system``,
a class's ``__reduce__``, ...). Annotation files only need plain data, so the unpickler here
resolves no global at all except the two container types that old pickle protocols spell as
globals (``set``, ``frozenset``); lists, dicts, tuples, strings, numbers, booleans and None have
opcodes of their own. Everything else is refused before it is looked up, let alone called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from stamp.data.io import DataError

# (module, name) pairs a plain-data pickle may reference; ``__builtin__`` is Python 2's name.
ALLOWED_GLOBALS = frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")
)


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle asked for something other than plain containers, strings and numbers."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only (see the module docstring)."""

    def __init__(self, file, source: str = "<pickle>") -> None:
        # Python 2 ``str`` objects arrive as bytes; decode them as text (REFER was written by Py2).
        super().__init__(file, encoding="utf-8", errors="replace")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return {"set": set, "frozenset": frozenset}[name]
        raise UnsafePickleError(
            f"{self.source}: refusing to load {module}.{name}: data pickles may only hold plain "
            "containers (list, dict, tuple, set), strings and numbers; this file asks for code to run"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refusing a persistent id ({pid!r}) in a data pickle")


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle plain data from ``data``; anything else raises ``UnsafePickleError``."""
    return RestrictedUnpickler(io.BytesIO(data), source).load()


def safe_load(path: str | Path) -> Any:
    """Unpickle plain data from the file at ``path`` (see ``safe_loads``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except UnsafePickleError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
    ) as e:
        raise DataError(f"cannot read pickle file {path}: {type(e).__name__}: {e}") from e
