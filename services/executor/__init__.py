"""The executor: dispatch, timeout monitor, dead letters and worker events."""
