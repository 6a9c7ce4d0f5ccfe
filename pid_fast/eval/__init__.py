"""Evaluation of students and teachers.

    metrics.py      Frechet distance / KID (clean-fid), Inception and digits features, image folders
    digits.py       the digits classifier whose features define the digits FD (pid-fast train-features)
    checkpoints.py  which weights to score (the 'auto' EMA rule) and scoring every checkpoint x weight set
    images.py       tensors in [-1, 1] to uint8, PNG grids and folders (Pillow)
    plots.py        loss curve, FD over training, FD against N, sample comparisons (matplotlib)
    lpips.py        the LPIPS norm (VGG16, average or max pooling) from local weight files
    vae.py          decoding latent samples through a local diffusers AutoencoderKL (EDM2's scaling; SD's scaling_factor)
    text_to_image.py  CLIP score from a local CLIP folder; RMSE of a text student to its guided teacher's Heun samples
"""
