"""The error raised for input a user can fix: a bad config value, path, prompt or concept."""

from __future__ import annotations


class UserInputError(ValueError):
    """One sentence that names the bad field or value and what is accepted; the CLI prints it and exits 2."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its type when it has none), at most ``limit`` characters."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def user_error_in(error: BaseException | None) -> UserInputError | None:
    """The UserInputError behind an exception (jsonargparse and Lightning wrap errors raised while building
    or running the objects), or None for a genuine failure, which keeps its traceback."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
