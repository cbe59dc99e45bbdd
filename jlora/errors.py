"""The errors jlora raises for bad input. Each says what was wrong; none leaves the engine broken."""


class JloraError(Exception):
    """Base class of every error jlora raises on purpose."""


class InvalidRequestError(JloraError, ValueError):
    """A request that cannot be served as given: empty prompt, bad token id, too long, bad sampling."""


class AdapterNotFoundError(JloraError, KeyError):
    """An adapter name that is not loaded."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterLoadError(JloraError, ValueError):
    """An adapter folder that cannot be loaded; nothing of it was loaded."""


class AdapterInUseError(JloraError, RuntimeError):
    """An adapter that cannot be unloaded because a running request uses it."""


class ModelLoadError(JloraError, ValueError):
    """A model path or format that cannot be loaded."""
