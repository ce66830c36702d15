"""The one exception type the CLI turns into a clean one-line error."""


class EdgequantError(Exception):
    """A user-facing failure: the message names the thing and what to do.

    ``exit_code`` follows the CLI convention: 2 for bad input, 1 for a
    failure while doing the work, 130 for an interrupt.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class BadInput(EdgequantError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class RunFailed(EdgequantError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned by the CLI into an interrupt so that it unwinds like Ctrl-C (exit 143)."""
