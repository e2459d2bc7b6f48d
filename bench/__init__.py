"""Benchmark harness for rtbroadcast (issue 8): fan-out throughput, latency and memory.

Run ``python -m bench --help``; see ``bench/README.md``.
"""
