"""The one exception type the analysis package raises for bad input."""


class AnalysisError(Exception):
    """A log, run directory or option that cannot be analysed.

    The message is a single line that names the offending file (or directory)
    and what is wrong with it, so the CLI can print it as-is.
    """
