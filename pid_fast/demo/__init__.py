"""The offline CPU demo on scikit-learn's digits (``pid-fast demo``) and the embedded default.

    run.py             run_demo: baselines -> distill -> score -> report, and the result table
    settings.py        the demo's recipe (DEMO_DEFAULTS), its trainer config, a run's checked settings
    data.py            the 1797 digits as 16x16 images in [-1, 1], the fixed split, shift augmentation
    teacher.py         the digits teacher: EDM's loss, its training loop (pid-fast train-teacher), loader
    classifier.py      the digits classifier whose features define the digits FD (pid-fast train-features)
    files.py           the bundled files' paths (pid_fast/assets/), atomic safetensors writes, recipes
    digits.py          the old single-module names (data + teacher + classifier + files), re-exported
    analytic_sweep.py  PID against the Gaussian-mixture teacher: one-step error vs N, exactly
"""

from pid_fast.demo.run import format_table, run_demo

__all__ = ["format_table", "run_demo"]
