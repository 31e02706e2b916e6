"""Models in plain PyTorch. nn/ imports torch and nothing else of aifab."""
