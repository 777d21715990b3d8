"""Errors the edit path raises for bad requests, bad weights and unsafe outputs."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """A request input is invalid; the message names the input."""

    def __init__(self, name: str, problem: str):
        self.name = name
        self.problem = problem
        super().__init__(f"{name} {problem}")

    def for_item(self, index: int) -> InvalidInputError:
        """The same problem with the list input's item `index` (0-based) named: `lora_weights item 2 is ...`."""
        return InvalidInputError(self.name, f"item {index + 1} {self.problem}")


class WeightsError(RuntimeError):
    """The weights directory is missing, incomplete or inconsistent; the message names what."""


class UnsafeOutputError(RuntimeError):
    """The safety checker found the output unsafe: it is not returned."""

    def __init__(self) -> None:
        super().__init__(
            "the edited image was flagged as NSFW by the safety checker and is not returned; "
            "try again with a different prompt or seed"
        )


class NonFiniteOutputError(RuntimeError):
    """The denoised latents hold NaN or infinite values (on a GPU, usually an overflow in half precision): the
    image would decode to black or noise, so none is returned."""

    def __init__(self, bad: int, total: int) -> None:
        super().__init__(
            f"the edit produced {bad} non-finite latent values (NaN or infinity) of {total}: no image is returned "
            "(it would be black); try another seed or prompt"
        )


class ParallelError(RuntimeError):
    """A server running on several GPUs lost a rank: a worker process died, failed or missed a deadline. The
    message names the rank; the server cannot edit again until it is restarted."""
