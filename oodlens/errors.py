"""The one exception type oodlens raises for user mistakes."""


class OodlensError(ValueError):
    """A mistake the user can fix: the message is one line naming the problem and the fix."""
