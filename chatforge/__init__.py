"""chatforge: turn conversations into a ChatGPT-style assistant, and serve it.

Nothing heavy is imported here, so `import chatforge` and `chatforge --help` stay fast.
"""

__version__ = "0.1.0"


def load(path_or_name: str, device: str | None = None, dtype: str | None = None, *, quantize: str | None = None,
         key=None):
    """Load a model folder (or a known name such as "smollm2-135m-instruct") as a Bot ready to chat.

    dtype: fp32, bf16 or fp16. quantize: int8-dyn, int8-wo or int4-wo. key: a chatforge.privacy.crypto.Key for an
    encrypted model folder (unset: the CHATFORGE_KEY environment variable).
    """
    from chatforge.generation.bot import Bot

    return Bot.load(path_or_name, device=device, dtype=dtype, quantize=quantize, key=key)
