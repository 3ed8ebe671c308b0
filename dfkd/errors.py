"""The one error family of dfkd: every bad input becomes ``DfkdError("<where>: <what>")``."""


class DfkdError(Exception):
    """A user-facing error. ``str(err)`` is the one line the CLI prints after ``dfkd: ``."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

    def __reduce__(self):  # a copy or a pickle rebuilt from its parts, not from its one-line text
        return type(self), (self.where, self.problem)


class OtherSettings(DfkdError):
    """Work refused because other settings made it; ``differing``: each setting that differs, as ``(name, old,
    new)`` (every one, where the message shows a few)."""

    def __init__(self, where: object, problem: str, differing: tuple[tuple[str, object, object], ...] = ()):
        super().__init__(where, problem)
        self.differing = tuple(differing)

    def __reduce__(self):
        return type(self), (self.where, self.problem, self.differing)
