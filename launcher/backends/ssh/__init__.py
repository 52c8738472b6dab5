"""The SSH backend: transport -> session (the nodes of one run) -> preflight, gather -> backend."""
