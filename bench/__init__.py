"""cpt benchmarks: harness (``run.py``), per-goal scripts, results (``results/*.json``) and the
report generator (``report.py``) that turns the results into docs/PERFORMANCE.md's tables."""
