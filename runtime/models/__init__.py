"""nn.Modules whose state dicts match the official Chatterbox checkpoint files."""
