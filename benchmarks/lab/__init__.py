"""Diagnostics that each answered one question about effiseg's speed, kept to reproduce the answer.

Their findings are in benchmarks/RESULTS.md; the tools a user runs are one level up (``effiseg-bench``,
``op_profile``, ``host_profile``). See benchmarks/README.md, "The lab".
"""
