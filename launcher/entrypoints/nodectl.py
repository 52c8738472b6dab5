"""Node-side control: find, check and stop a run's processes; list and hash its files.

Standard library only: the local backend imports it, and the SSH backend copies it to every node
and runs `python nodectl.py COMMAND ...` there, printing JSON.

msrun starts each worker in a session of its own, so killing one process group is not enough.
Every process of a run inherits LAUNCHER_RUN_ID (and LAUNCHER_JOB) from the node script; that is
how we find them.
"""

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time

RUN_ID_VAR = "LAUNCHER_RUN_ID"
JOB_VAR = "LAUNCHER_JOB"
NODE_VAR = "LAUNCHER_NODE"


def processes_with(var, value):
    """Pids of live processes (not zombies) whose environment has var=value."""
    marker = ("%s=%s" % (var, value)).encode()
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                environ = f.read()
            with open("/proc/%s/stat" % name) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if state != "Z" and marker in environ.split(b"\0"):
            found.append(int(name))
    return sorted(found)


def run_processes(run_id):
    return processes_with(RUN_ID_VAR, run_id)


def stop_processes(find, group_leaders=(), grace=10.0):
    """SIGTERM what find() returns, SIGKILL what is left after `grace` seconds. Returns pids still alive."""
    for pid in group_leaders:
        _signal_group(pid, signal.SIGTERM)
    for pid in find():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not find():
            return []
        time.sleep(0.2)
    for pid in group_leaders:
        _signal_group(pid, signal.SIGKILL)
    for pid in find():
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = find()
    return left


def stop_run(run_id, group_leaders=(), grace=10.0):
    return stop_processes(lambda: run_processes(run_id), group_leaders, grace)


def dump_stacks(run_id, workdir):
    """SIGUSR1 to the run's ranks (the pids they wrote in output/launcher/rank_N.pid that still carry the
    run id, since a pid may be reused): finetune.py's faulthandler writes their stacks to their logs.
    Only the ranks: SIGUSR1 would end msrun or the shell, which have no handler for it."""
    alive = set(run_processes(run_id))
    status = os.path.join(workdir, "output", "launcher")
    signalled = []
    for name in sorted(os.listdir(status)) if os.path.isdir(status) else []:
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(status, name)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if pid in alive:
            _signal(pid, signal.SIGUSR1)
            signalled.append(pid)
    return signalled


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root, patterns, with_hash=True):
    """Files under root matching any glob (relative paths), with size and (unless told not to) sha256."""
    out = []
    for base, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, root)
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                entry = {"path": rel, "size": os.path.getsize(path)}
                if with_hash:
                    entry["sha256"] = sha256_file(path)
                out.append(entry)
    return sorted(out, key=lambda f: f["path"])


def _version(module):
    try:
        from importlib import metadata
        return metadata.version(module)
    except Exception:  # noqa: BLE001 - any failure means "not installed here"
        return None


def _port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def preflight(workdir, job, port, min_free_mb, dataset=None):
    """What this node offers the job: tools, versions, a writable workdir with room, port, stale processes,
    and the dataset the job reads from this node's disk."""
    report = {
        "dataset": dataset,
        "dataset_readable": os.access(dataset, os.R_OK) if dataset else None,
        "python": sys.executable,
        "msrun": shutil.which("msrun"),
        "tar": shutil.which("tar"),
        "mindspore": _version("mindspore"),
        "mindformers": _version("mindformers"),
        "workdir_writable": False,
        "free_mb": None,
        "port_free": _port_free(port) if port else None,
        "stale": [],
    }
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".launcher-write-test-%d" % os.getpid())
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        report["workdir_writable"] = True
        usage = shutil.disk_usage(workdir)
        report["free_mb"] = usage.free // (1 << 20)
    except OSError as exc:
        report["workdir_error"] = str(exc)
    report["enough_room"] = report["free_mb"] is not None and report["free_mb"] >= min_free_mb
    for pid in processes_with(JOB_VAR, job):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        report["stale"].append({"pid": pid, "cmd": cmd[:200]})
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nodectl.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--workdir", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--min-free-mb", type=int, default=1024)
    p.add_argument("--dataset", help="the dataset's path on this node, when the job reads it from here")
    p = sub.add_parser("stop", help="stop every process of a run")
    p.add_argument("run_id")
    p.add_argument("--grace", type=float, default=10.0)
    p = sub.add_parser("kill-job", help="stop every process of any earlier run of a job")
    p.add_argument("job")
    p = sub.add_parser("dump-stacks", help="make a run's ranks write their Python stacks to their logs")
    p.add_argument("run_id")
    p.add_argument("--workdir", required=True)
    p = sub.add_parser("alive", help="pids of a run's processes")
    p.add_argument("run_id")
    p = sub.add_parser("list-files")
    p.add_argument("--no-hash", action="store_true", help="sizes only (fast)")
    p.add_argument("root")
    p.add_argument("patterns", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "preflight":
        result = preflight(args.workdir, args.job, args.port, args.min_free_mb, args.dataset)
    elif args.command == "stop":
        result = {"left": stop_run(args.run_id, grace=args.grace)}
    elif args.command == "kill-job":
        result = {"left": stop_processes(lambda: processes_with(JOB_VAR, args.job))}
    elif args.command == "dump-stacks":
        result = {"signalled": dump_stacks(args.run_id, args.workdir)}
    elif args.command == "alive":
        result = {"pids": run_processes(args.run_id)}
    else:
        result = {"files": list_files(args.root, args.patterns, with_hash=not args.no_hash)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
