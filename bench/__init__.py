"""murderd's benchmarks: `make bench` runs bench/run.py (see README.md, Benchmarks)."""
