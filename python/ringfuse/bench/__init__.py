"""Benchmarks behind ``ringfuse bench`` and bench/*.py: ringfuse vs its baseline, measured
in the same run, with ratios and fractions of the machine limits."""
