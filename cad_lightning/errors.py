"""The error raised for input a user can fix: a bad config value, path, prompt or concept."""


class UserInputError(ValueError):
    """One sentence that names the bad field or value and what is accepted; the CLI prints it and exits 2."""
