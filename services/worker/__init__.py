"""The worker: runs attempts of the actions it offers, each in a child process."""
