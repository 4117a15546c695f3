"""Reference models, offline datasets and label noise for the demo, tests and benchmarks (not installed)."""
