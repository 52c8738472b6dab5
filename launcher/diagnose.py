"""Why a run failed: a kind, a fix and the line that shows it, matched from run.json and the gathered logs.

diagnose() looks at the run in this order and stops at the first pattern that matches:
  1. run.json's message: what the backend saw (a lost node, pods that never ran or were evicted, a stall);
  2. how the failing rank ended: its exit record, or the node script's or msrun's line about it;
  3. the ranks' logs, the failing rank's first;
  4. failing all these, the last line that says error in the same logs, then in the node logs (whose
     tracebacks are msrun's and its scheduler's, which only report that a rank ended).
Within each place, PATTERNS is tried in its order, the most specific first. Only the last TAIL_BYTES of
a log are read: the cause of a failure is at its end, and a log can grow to gigabytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from launcher.plan import STATUS_DIR, LaunchPlan
from launcher.runs import MIRROR_DIR, NODE_LOG, RANKS_DIR

TAIL_BYTES = 256 << 10
SUMMARY_CHARS = 300
# The logging prefix a summary leaves out (the evidence keeps the whole line): MindSpore's and CANN's
# "[ERROR] ME(pid:tid,MainProcess):time [file:line] function] " (mindspore/log.py), HCCL's without the
# function, MindFormers' "date time - logger[file:line] - ERROR - " (mindformers/tools/logger.py), or a
# bare "[ERROR] ".
_PREFIX = re.compile(r"^\[[A-Z]+\] [A-Z_]+\([^)]*\):\S+ \[[^\]]+\] (\w+\] )?"
                     r"|^\d{4}-\d\d-\d\d [\d:,.]+ - .*? - (ERROR|CRITICAL|WARNING|INFO) - |^\[[A-Z]+\] ")

MESSAGE, EXIT, LOG, FALLBACK = "message", "exit", "log", "fallback"

FIXES = {
    "node_lost": "the node stopped answering over SSH: check that it is up and reachable (ssh to it, its network "
                 "and power), run 'launcher down {run}' once it is back (its ranks may still run), then start again",
    "pod_unschedulable": "no node could take the pods: read the FailedScheduling events ('kubectl describe pod'), "
                         "then free or add nodes with the devices, CPU and memory the pods request, ask for fewer, "
                         "or fix the node selector, taints or Volcano queue that keep them off",
    "pod_evicted": "the pod was evicted or deleted while it ran: give it memory and ephemeral-storage requests "
                   "that cover its use, free the node's disk, or keep the node out of a drain until the run ends",
    "stalled": "no rank made progress: read every rank's last lines for a hang (a collective waiting for a peer, "
               "a data loader waiting for input) and raise the stall timeout if steps are only slow",
    "killed": "the rank was killed with SIGKILL, which is how the kernel's OOM killer ends a process (look for "
              "'Out of memory: Killed process' in dmesg, or OOMKilled on the pod): lower batch_size or seq_length, "
              "run fewer ranks per node, or give the node or pod more memory",
    "host_oom": "the host ran out of memory: lower batch_size or seq_length, use fewer dataset workers, run fewer "
                "ranks per node, or give the node or pod more memory",
    "device_oom": "the device ran out of memory: lower batch_size or seq_length, turn on recompute, raise "
                  "model or pipeline parallelism so each device holds less, or use devices with more memory",
    "hccl_timeout": "the ranks could not reach each other in time: check that no rank failed first, check the rank "
                    "table (every server_id and device_ip) and the network between the devices "
                    "('hccn_tool -i DEVICE -tls -g', ping the device IPs), then raise HCCL_CONNECT_TIMEOUT "
                    "(socket setup, 120 s by default) or HCCL_EXEC_TIMEOUT (a collective's wait) in env:",
    "bad_data": "the dataset could not be read as MindRecord: check that dataset.path names the MindRecord file "
                "with its .db index beside it, complete and the same on every node, and write it again "
                "('launcher data prepare JOB', or MindSpore's FileWriter) if it is truncated",
    "python_exception": "fix what the exception names (the job's config, the model code or the input), then "
                        "start again; the whole traceback: 'launcher logs {run} --rank {rank}'",
    "unknown": "no known cause was found: read the rank's log ('launcher logs {run} --rank {rank}') and the "
               "node log in the run directory",
}


def _exception_line(lines: list[str], header: int) -> int | None:
    """After a 'Traceback' header, the first line that is not an indented frame: 'Type: message'."""
    for i in range(header + 1, len(lines)):
        if lines[i].strip() and not lines[i].startswith((" ", "\t")):
            return i
    return None


@dataclass(frozen=True)
class Pattern:
    kind: str
    # MESSAGE: run.json's message; EXIT: how a rank ended; LOG: a line of a log; FALLBACK: a line of a log,
    # tried only when no other pattern matched anywhere.
    scope: str
    regex: re.Pattern
    fix: str
    says: str = ""  # the summary, when the matched line alone would not say it
    pick: Callable[[list[str], int], int | None] | None = None  # from the matched line to the one to show


def _p(kind: str, scope: str, regex: str, fix: str = "", **kw) -> Pattern:
    return Pattern(kind, scope, re.compile(regex), FIXES[fix or kind], **kw)


PATTERNS = (
    # launcher/backends/ssh/backend.py: "node {index} ({host}) lost: no answer for {node_lost_after}s".
    _p("node_lost", MESSAGE, r"node \d+ \(.*\) lost: no answer for"),
    # launcher/backends/k8s/cluster.py pending_reasons: "{n} pods still Pending after {timeout}s:", then each
    # pod's Warning events; kube-scheduler's reason is "FailedScheduling" with the FitError text
    # "0/%v nodes are available" (kubernetes/kubernetes pkg/scheduler/framework/types.go, NoNodeAvailableMsg).
    _p("pod_unschedulable", MESSAGE, r"FailedScheduling|\d+/\d+ nodes are available|pods still Pending after"),
    # The kubelet's eviction: status reason "Evicted" and "The node was low on resource: %v. "
    # (kubernetes/kubernetes pkg/kubelet/eviction/helpers.go, Reason and nodeLowMessageFmt); and
    # launcher/backends/k8s/cluster.py watch: "pods deleted while the job ran: ..." (a drain's eviction deletes).
    _p("pod_evicted", MESSAGE, r"\bEvicted\b|The node was low on resource|pods deleted while the job ran"),
    # The launcher's own word for a run whose ranks made no progress (a stall watchdog's message).
    _p("stalled", MESSAGE, r"(?i)\bstall(ed)?\b"),
    # A rank's exit record (output/launcher/rank_N.exit) holds the shell's status of the rank: 128 + 9
    # for SIGKILL (launch_ranktable.sh.j2 writes "$?"); Kubernetes reports the same 137 for a container
    # killed by SIGKILL, OOMKilled included (mirrored by launcher/backends/k8s/cluster.py); -9 is Popen's.
    _p("out_of_memory", EXIT, r"^(137|-9)$", "killed",
       says="killed by SIGKILL, as the kernel's OOM killer ends a process (exit 137)"),
    # msrun: "Worker process {pid} exit with exception. Error code: {ret_code}." where ret_code is Popen's
    # returncode, -9 for SIGKILL (mindspore 2.7.2, mindspore/parallel/cluster/process_entity/_api.py,
    # join_processes).
    _p("out_of_memory", EXIT, r"Worker process (?P<pid>\d+) exit with exception\. Error code: -9\b", "killed",
       says="killed by SIGKILL, as the kernel's OOM killer ends a process (msrun: Error code -9)"),
    # templates/launch_ranktable.sh.j2: "rank {rank} exited with code {rc}; stopping the other ranks".
    _p("out_of_memory", EXIT, r"rank (?P<rank>\d+) exited with code 137\b", "killed",
       says="killed by SIGKILL, as the kernel's OOM killer ends a process (exit 137)"),
    # Device memory. MindSpore: "Out of Memory!!! Request memory size: ..." (mindspore-ai/mindspore,
    # mindspore/ccsrc/plugin/device/ascend/hal/device/ascend_memory_adapter.cc, MallocStaticDevMem);
    # "Device(id:N) memory isn't enough and alloc failed, kernel name: ..." and on the CPU "Memory isn't
    # enough and alloc failed" (mindspore/ccsrc/runtime/graph_scheduler/actor/actor_common.h,
    # SET_OPCONTEXT_MEMORY_ALLOC_FAIL_BY_STRATEGY; both in the 2.7.2 wheel's libmindspore_ms_backend.so, with
    # "Allocate memory failed"). CANN: EL0004 Memory_Allocation_Failure "Failed to allocate memory" and
    # EI0011/EL0019 Resource_Error_Insufficient_Device_Memory (hiascend.com CANN error codes,
    # maintenref/troubleshooting/atlaserrorcode_15_0267.html, _15_0324.html, _15_0462.html).
    _p("out_of_memory", LOG, r"Out of Memory!!! Request memory size|(?i:memory isn't enough and alloc failed)"
       r"|Allocate memory failed|\bEL0004\b|Memory_Allocation_Failure|\bE[IL]00(11|19)\b"
       r"|Resource_Error_Insufficient_Device_Memory", "device_oom"),
    # Host memory: Python's MemoryError (docs.python.org/3/library/exceptions.html#MemoryError) and the
    # C++ runtime's std::bad_alloc, which libstdc++'s terminate handler names.
    _p("out_of_memory", LOG, r"^MemoryError\b|std::bad_alloc", "host_oom"),
    # HCCL. EI0006 Communication_Error_Get_Socket "Getting socket times out. Reason: %s" (fix: network,
    # HCCL_CONNECT_TIMEOUT; hiascend.com CANN error codes, maintenref/troubleshooting/atlaserrorcode_15_0246.html);
    # EI0002 "The wait execution of the Notify register times out" / "An timeout occurs when the Notify
    # register waits" (atlaserrorcode_15_0242.html, HCCL_EXEC_TIMEOUT); EI0015 "topo exchange agent get socket
    # timeout!" (canncommercial/850/commlib/hcclug/hcclug_000037.html); HCCL's "wait socket establish timeout"
    # (as quoted in vllm-project/vllm-ascend issue 1955); an [ERROR] line naming HCCL_CONNECT_TIMEOUT.
    _p("hccl_timeout", LOG, r"\bEI00(06|02|15)\b|Getting socket times out|Notify register (waits|times out)"
       r"|notify wait timeout|get socket timeout|wait socket establish timeout|\[ERROR\].*HCCL_CONNECT_TIMEOUT"),
    # MindRecord (mindspore 2.7.2): "Invalid file, ... mindrecord ..." from the shard reader
    # (_c_mindrecord; e.g. "Invalid file, the size of mindrecord file header is larger than the upper limit.
    # The invalid mindrecord file is [...]", minddata/mindrecord/meta/shard_header.cc); "MindRecord File could
    # not open successfully" (mindspore/mindrecord/common/exceptions.py, MRMOpenError); "The input: {} is not
    # exists." (mindspore/mindrecord/config.py); "The file {} does not exist or permission denied!"
    # (mindspore/dataset/core/validator_helpers.py, check_file).
    _p("bad_data", LOG, r"Invalid file.*(?i:mindrecord)|MindRecord File could not open successfully"
       r"|The input: \S+ is not exists\.|The file .+ does not exist or permission denied!"),
    # Python's traceback module: "Traceback (most recent call last):", the frames indented, then
    # "Type: message" (docs.python.org/3/library/traceback.html). The last block is the one that ended it.
    _p("python_exception", LOG, r"^Traceback \(most recent call last\):", pick=_exception_line),
    # The fallback: the last line that says error, in MindSpore's "[ERROR]", MindFormers' "- ERROR -" or
    # Python's "...Error:" forms.
    _p("unknown", FALLBACK, r"\b(ERROR|CRITICAL|FATAL)\b|\w(Error|Exception)\b|\b[Ff]ailed\b"),
)


class _Tail:
    """The lines of a file's last TAIL_BYTES, read once; whole: they start at the file's first line."""

    def __init__(self, path: Path):
        self.path, self.whole = path, True

    @cached_property
    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - TAIL_BYTES))
                data = f.read()
        except OSError:
            return []
        self.whole = size <= TAIL_BYTES
        if not self.whole:
            data = data[data.find(b"\n") + 1:]  # the first line is cut
        return data.decode(errors="replace").splitlines()


@dataclass
class _Source:
    """One place to match: a log's tail, a rank's exit record, or run.json's message."""

    scope: str
    rel: str  # what the evidence names: a path relative to the run directory
    rank: int | None
    tail: _Tail | None = None
    text: str = ""

    @property
    def lines(self) -> list[str]:
        return self.tail.lines if self.tail else self.text.splitlines()

    def where(self, index: int) -> str:
        if self.tail is None or self.tail.whole:
            return f"{self.rel}:{index + 1}"
        return f"{self.rel} (line {index + 1} of its last {TAIL_BYTES >> 10} KiB)"


def diagnose(run_dir: Path, record, plan: LaunchPlan) -> dict | None:
    """The failure of a run that did not succeed: kind, rank, summary, fix and evidence (a file, its line
    number and the line). None for a run that succeeded or was stopped by the user."""
    if record.state in ("succeeded", "interrupted", "starting", "running"):
        return None
    pids = _rank_pids(run_dir, plan)
    for source in _sources(run_dir, record, plan):
        for pattern in PATTERNS:
            if pattern.scope != source.scope:
                continue
            found = _last_match(pattern, source.lines)
            if found is None:
                continue
            index, line = found
            rank = _rank_of(pattern, source, line, record, plan, pids)
            if rank is False:
                continue  # about a rank that was stopped because another one failed
            return _failure(pattern.kind, rank, pattern.says or line, pattern.fix, record,
                            f"{source.where(index)}: {line.strip()}")
    return _failure("unknown", record.failed_rank, record.message or "no error line in the logs",
                    FIXES["unknown"], record, f"run.json message: {record.message}" if record.message else "")


def _failure(kind: str, rank: int | None, summary: str, fix: str, record, evidence: str) -> dict:
    summary = " ".join(_PREFIX.sub("", summary.strip(), count=1).split())
    return {"kind": kind, "rank": rank, "summary": summary[:SUMMARY_CHARS],
            "fix": fix.format(run=record.run_id, rank=rank if rank is not None else "N"),
            "evidence": evidence[:SUMMARY_CHARS * 2]}


def _last_match(pattern: Pattern, lines: list[str]) -> tuple[int, str] | None:
    for i in range(len(lines) - 1, -1, -1):
        if pattern.regex.search(lines[i]):
            shown = pattern.pick(lines, i) if pattern.pick else i
            if shown is not None:
                return shown, lines[shown]
    return None


def _rank_of(pattern: Pattern, source: _Source, line: str, record, plan: LaunchPlan, pids: dict[int, int]):
    """The rank a match is about; False when it is about a rank other than the one that failed first."""
    if pattern.scope != EXIT:
        return source.rank
    m = pattern.regex.search(line)
    groups = m.groupdict() if m else {}
    rank = source.rank
    if groups.get("rank"):
        rank = int(groups["rank"])
    elif groups.get("pid"):
        rank = pids.get(int(groups["pid"]), _only_rank(source, plan))
    if rank is None:
        return record.failed_rank
    if record.failed_rank is not None and rank != record.failed_rank:
        return False
    return rank


def _only_rank(source: _Source, plan: LaunchPlan) -> int | None:
    """The rank of a node log's node, when the node runs one."""
    for node in plan.nodes:
        if source.rel in _node_logs(node.index) and len(node.ranks) == 1:
            return node.ranks[0]
    return None


def _node_logs(index: int) -> tuple[str, ...]:
    # The local node script's output, and each SSH node's node.log as gather fetches it.
    return ((NODE_LOG,) if index == 0 else ()) + (f"nodes/node-{index}/node.log",)


def _status_dirs(run_dir: Path) -> list[Path]:
    # A local run's own output/launcher/, and the mirror that SSH and Kubernetes runs copy it into.
    return [run_dir / STATUS_DIR, run_dir / MIRROR_DIR / STATUS_DIR]


def _rank_pids(run_dir: Path, plan: LaunchPlan) -> dict[int, int]:
    """pid -> rank, from the rank_N.pid files the entrypoint writes."""
    pids = {}
    for folder in _status_dirs(run_dir):
        for slot in plan.ranks:
            try:
                pids[int((folder / f"rank_{slot.rank}.pid").read_text())] = slot.rank
            except (OSError, ValueError):
                continue
    return pids


def _sources(run_dir: Path, record, plan: LaunchPlan):
    """Where to look, in the order to look: run.json's message, how ranks ended, the logs, the logs again."""
    first = record.failed_rank
    ranks = sorted(range(plan.world_size), key=lambda r: (r != first, r))
    node_logs = {rel: _Tail(run_dir / rel) for node in plan.nodes for rel in _node_logs(node.index)
                 if (run_dir / rel).is_file()}
    rank_logs = {(rank, rel): _Tail(run_dir / rel) for rank in ranks
                 for rel in (f"{RANKS_DIR}/rank_{rank}/console.log", f"{RANKS_DIR}/rank_{rank}/log/error.log")
                 if (run_dir / rel).is_file()}
    yield _Source(MESSAGE, "run.json message", None, text=record.message or "")
    for rank in ranks:
        for folder in _status_dirs(run_dir):
            path = folder / f"rank_{rank}.exit"
            if path.is_file():
                yield _Source(EXIT, str(path.relative_to(run_dir)), rank, _Tail(path))
    for rel, tail in node_logs.items():
        yield _Source(EXIT, rel, None, tail)
    for scope in (LOG, FALLBACK):
        for (rank, rel), tail in rank_logs.items():
            yield _Source(scope, rel, rank, tail)
    for rel, tail in node_logs.items():
        yield _Source(FALLBACK, rel, None, tail)
