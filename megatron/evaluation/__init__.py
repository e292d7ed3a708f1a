"""Evaluation of generated images: a Frechet distance in a small classifier's feature space, image grids."""
