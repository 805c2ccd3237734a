"""The guard's error type: every message says what was wrong and what to do."""


class GuardError(ValueError):
    """Bad input or state detected by the guard, with an actionable message."""


class GuardWarning(UserWarning):
    """The guard works, but weaker than it could: said through :mod:`warnings`, so it shows even while
    the guard's log is off."""
