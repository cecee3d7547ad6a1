"""Benchmarks of lars_tf and the training app, one script per question.

Run one as `python -m benchmarks.<name>` from the checkout's root; BENCHMARKS.md
gives each one's question, command and figures.
"""
