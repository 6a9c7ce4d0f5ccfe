"""The offline CPU demo on scikit-learn's digits (``pid-fast demo``)."""

from pid_fast.demo.run import format_table, run_demo

__all__ = ["format_table", "run_demo"]
