"""The data layer: read conversations in many formats, clean and de-duplicate them, split them, count every drop.

`load_dataset(spec)` is what training and evaluation call; `chatforge.data.prepare.prepare` writes a prepared folder.
"""

from chatforge.data.prepare import load_dataset

__all__ = ["load_dataset"]
