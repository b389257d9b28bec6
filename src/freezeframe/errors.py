"""Exceptions freezeframe raises to its users."""


class FreezeFrameError(Exception):
    """Bad input given to freezeframe: the message names the thing at fault."""


class RunError(FreezeFrameError):
    """A run directory that cannot be read (not a run, newer schema, truncated manifest...)."""
