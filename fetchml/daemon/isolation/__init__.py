"""How jobs are isolated: bubblewrap and podman command lines, cgroups, the per-attempt policy."""
