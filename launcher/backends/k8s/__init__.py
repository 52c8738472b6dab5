"""The Kubernetes backend: objects (names and owners) -> cluster (the API) -> backend."""
