"""The one exception type for bad input: the CLI prints it as a single `error:` line and exits 1."""


class OmniError(Exception):
    """A problem with the user's files, flags or data, phrased so the user can fix it."""
