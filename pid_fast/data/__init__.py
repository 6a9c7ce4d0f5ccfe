"""Data and bundled files shared by the evaluation and the demo (below both).

    digits.py   the 1797 digits as 16x16 images in [-1, 1], the fixed split, shift augmentation
    assets.py   the bundled files' paths (pid_fast/assets/), atomic safetensors writes, recipes
"""
