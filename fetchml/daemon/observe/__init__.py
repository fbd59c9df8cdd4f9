"""Observation: Prometheus metrics of the daemon, training metrics that jobs write, series."""
