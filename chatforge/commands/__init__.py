"""The command layer: flags -> library call -> print. Nothing below this layer prints."""
