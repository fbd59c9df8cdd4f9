"""Running one attempt outside the daemon: the run directory (rundir) and its records, the
identity of the processes they name, the supervisor, the launcher that forks supervisors,
spawning the command and enforcing its limits.

Everything here runs in forked processes: it imports only the standard library, psutil,
``fetchml.errors`` and itself (a test checks it), so a supervisor starts in milliseconds.
"""
