"""Example actions, used by `make demo`, the tests and the benchmark."""
