"""Attach context to an exception without changing its type (PEP 678 notes)."""


def add_note(error, note):
    """``error.add_note(note)`` on Python >= 3.11; on 3.9 and 3.10 the note is stored the
    same way (``__notes__``) for callers and tests, though tracebacks do not print it."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]
