"""Training script and config of the project's small reference video DiT."""
