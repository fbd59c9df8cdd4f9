"""`fetchml tui`: a live terminal dashboard (Textual) of jobs, GPUs, logs and metrics.

Imported only by the `tui` command: Textual stays out of every other command's start-up.
``feeds`` reads the daemon's streams in background threads, ``model`` holds what the screen
shows (no Textual), ``plot`` draws a series in braille, ``widgets`` and ``app`` are the screen.
"""
