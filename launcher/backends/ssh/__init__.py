"""The SSH backend: transport -> session (the nodes of one run) -> preflight, staging, gather -> backend."""

import warnings

with warnings.catch_warnings():
    # asyncssh names DSA keys at import, and cryptography warns about that to the user on every SSH command.
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh  # noqa: F401  (imported here once, before any module of this package)
