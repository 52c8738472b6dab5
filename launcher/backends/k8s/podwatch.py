"""The pods of one run, as a watch brings them: listed once, then watched with streams the server closes
after WATCH_SECONDS (timeoutSeconds), each resuming from the resourceVersion the one before reached.
So every change arrives, in order, also across a dropped connection; a pod that failed is told though
it was deleted before the launcher looked again. A version the server no longer keeps (410 Gone, after
an outage longer than its watch cache holds) lists the pods again.
"""

from __future__ import annotations

import time

from launcher.backends.k8s.api import api_message, phase
from launcher.errors import BackendError

WATCH_SECONDS = 1
API_OUTAGE_S = 120  # an unreachable API is tried again this long before the launcher gives up on the run


class PodWatch:
    def __init__(self, core, ns: str, selector: str, host: str, request_timeout: float):
        self.core, self.ns, self.selector, self.host, self.request_timeout = core, ns, selector, host, request_timeout
        self.state: dict = {}  # the run's pods as the watch has brought them so far, by name
        self.resource_version: str | None = None  # where the next watch resumes; None: list first
        self.failures: dict = {}  # pods seen Failed by themselves (not by their deletion), though gone since

    def pods(self) -> dict:
        """The run's pods now: the first call lists them, each later one watches for WATCH_SECONDS.
        An API that cannot be reached, or answers 5xx or 429, is tried again for API_OUTAGE_S."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        outage_since = None
        while True:
            try:
                if self.resource_version is None:
                    self._list_pods()
                self._watch_pods()
                return dict(self.state)
            except ApiException as exc:
                if exc.status == 410:
                    self.resource_version = None
                    continue
                if exc.status < 500 and exc.status != 429:
                    raise BackendError(f"watch pods: {api_message(exc)}") from None
                error = f"{exc.status} {api_message(exc)}"
            except HTTPError as exc:
                error = str(exc)
            outage_since = outage_since or time.monotonic()
            if time.monotonic() - outage_since > API_OUTAGE_S:
                raise BackendError(f"watch pods: cannot reach the Kubernetes API at {self.host} "
                                   f"for {API_OUTAGE_S}s: {error}") from None
            time.sleep(1)

    def _list_pods(self) -> None:
        found = self.core.list_namespaced_pod(self.ns, label_selector=self.selector, _request_timeout=self.request_timeout)
        self.state = {pod.metadata.name: pod for pod in found.items}
        for pod in found.items:
            self._note(pod)
        self.resource_version = found.metadata.resource_version

    def _watch_pods(self) -> None:
        from kubernetes import watch

        stream = watch.Watch()
        for event in stream.stream(self.core.list_namespaced_pod, self.ns, label_selector=self.selector,
                                   resource_version=self.resource_version, allow_watch_bookmarks=True,
                                   timeout_seconds=WATCH_SECONDS, _request_timeout=WATCH_SECONDS + self.request_timeout):
            if event["type"] in ("ADDED", "MODIFIED"):
                self.state[event["object"].metadata.name] = event["object"]
                self._note(event["object"])
            elif event["type"] == "DELETED":
                self.state.pop(event["object"].metadata.name, None)
            self.resource_version = stream.resource_version  # a drop mid-stream resumes after this event

    def _note(self, pod) -> None:
        """A pod that failed by itself: kept, for its failure must be told though the pod is deleted later."""
        if phase(pod) == "Failed" and not pod.metadata.deletion_timestamp:
            self.failures.setdefault(pod.metadata.name, pod)
