"""Datasets: the service jobs see, the version registries (SQLite, Redis), the per-host cache."""
