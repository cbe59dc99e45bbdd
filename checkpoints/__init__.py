"""Format I/O: GGUF, Hugging Face safetensors folders, PEFT adapters, orbax. Never imports jlora."""
