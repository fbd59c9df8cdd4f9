"""The content-addressed store: hashing, objects, snapshot manifests, scanning and ignore rules.

Usable without the daemon: this package imports only the standard library, blake3, msgpack,
pathspec and ``fetchml.errors``, and every API is synchronous (the daemon calls it through
``asyncio.to_thread``).
"""

from __future__ import annotations
