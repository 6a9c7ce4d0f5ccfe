"""Evaluation: Frechet distances and features, images, plots, the LPIPS norm."""
