"""Evaluation: a language model's loss and perplexity on held-out text (lm_loss.py); for generated images a
Frechet distance in a small classifier's feature space (frechet.py) and image grids (grids.py)."""
