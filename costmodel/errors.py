"""The one exception type for bad input anywhere in the cost model.

Every message is one line that names what is wrong and how to mend it; the command line
prints it and exits with status 2.
"""


class ConfigError(ValueError):
    """Input that cannot describe a real model, cluster or strategy."""
