"""The one error family of dfkd: every bad input becomes ``DfkdError("<where>: <what>")``."""


class DfkdError(Exception):
    """A user-facing error. ``str(err)`` is the one line the CLI prints after ``dfkd: ``."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class OtherSettings(DfkdError):
    """Work refused because other settings made it; ``differing`` names each setting that differs (every one,
    where the message shows a few)."""

    def __init__(self, where: object, problem: str, differing: tuple[str, ...] = ()):
        super().__init__(where, problem)
        self.differing = tuple(differing)
