"""chatforge: turn conversations into a ChatGPT-style assistant, and serve it.

Nothing heavy is imported here, so `import chatforge` and `chatforge --help` stay fast.
"""

__version__ = "0.1.0"


def load(path_or_name: str, device: str | None = None, dtype: str | None = None):
    """Load a model folder (or a known name such as "smollm2-135m-instruct") as a Bot ready to chat."""
    from chatforge.generation.bot import Bot

    return Bot.load(path_or_name, device=device, dtype=dtype)
