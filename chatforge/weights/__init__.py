"""Where weights come from and go: name resolution and cache, the model-folder format, GGUF, LoRA, the one loader."""
