"""Errors the edit path raises for bad requests and bad weights."""


class InvalidInputError(ValueError):
    """A request input is invalid; the message names the input."""

    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(f"{name} {problem}")


class WeightsError(RuntimeError):
    """The weights directory is missing, incomplete or inconsistent; the message names what."""
