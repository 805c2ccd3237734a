"""The guard's error type: every message says what was wrong and what to do."""


class GuardError(ValueError):
    """Bad input or state detected by the guard, with an actionable message."""
