"""The offline CPU demo on scikit-learn's digits (``pid-fast demo``) and the embedded default.

    run.py             run_demo: baselines -> distill -> score -> report, and the result table
    settings.py        the demo's recipe (DEMO_DEFAULTS), its trainer config, a run's checked settings
    teacher.py         the digits teacher: EDM's loss, its training loop (pid-fast train-teacher), loader
    files.py           the bundled teachers' paths (pid_fast.data.assets re-exported)
    digits.py          the old single-module names (data + teacher + classifier + files), re-exported
The digits data is pid_fast.data.digits and the digits classifier (the FD's features,
pid-fast train-features) pid_fast.eval.digits: below the demo, so the evaluation needs no demo.
    analytic_sweep.py  PID against the Gaussian-mixture teacher: one-step error vs N, exactly
"""

from pid_fast.demo.run import format_table, run_demo

__all__ = ["format_table", "run_demo"]
