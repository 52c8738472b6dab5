"""What runs inside one rank: load the rendered MindFormers config and fine-tune with Trainer.

It is copied into every plan (entrypoint/finetune.py), so nodes need MindSpore and MindFormers
but not the launcher. Usage: python finetune.py run.yaml  (under msrun, or with the rank-table env).

Environment it reads:
  RANK_ID          global rank (set by msrun or by the rank-table script)
  MS_ROLE          MS_SCHED for MindSpore's dynamic-cluster scheduler, which only coordinates
  LAUNCHER_FAULT   "RANK:STEP[:MODE[:ATTEMPT]]" makes that rank fail at that step (the global step the
                   logs show, which a resumed attempt continues), in every attempt or only in ATTEMPT: a
                   drill for teardown paths, failure diagnosis and restarts. MODE raise (the default)
                   raises RuntimeError; kill sends the rank SIGKILL, as the kernel's OOM killer does:
                   nothing is written on the way out, and its parent sees signal 9 (exit 137 in a shell
                   or a pod, "Error code: -9" from msrun); sleep stops making progress, as a hung
                   collective does, for the stall watchdog
  LAUNCHER_MODEL_MODULES  "DIR:mod,mod": a research model's folder and the modules that register its
                   classes (MindFormers only registers them when they are imported)
"""

import faulthandler
import importlib
import inspect
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback

STATUS_DIR = os.path.join("output", "launcher")
# The launcher's stall watchdog sends this signal before it stops a stalled run: every thread's Python
# stack goes to stderr (the rank's console log), to show where the rank waits.
STACKS_SIGNAL = signal.SIGUSR1
# Where no launcher can signal the rank (a Kubernetes pod: no exec), it asks for the stacks with this
# file in STATUS_DIR, which a thread of the rank looks for.
STACKS_REQUEST = "dump-stacks"


def _watch_stacks_request(poll_s=1.0):
    """Write every thread's stack to stderr once STACKS_REQUEST appears (a daemon thread's loop). The
    thread dumps them itself, holding the GIL: signalling its own process and then ending would let
    faulthandler's handler walk the threads while this one's state is freed (a segmentation fault)."""
    request = os.path.join(STATUS_DIR, STACKS_REQUEST)
    while not os.path.exists(request):
        time.sleep(poll_s)
    faulthandler.dump_traceback(all_threads=True)
    sys.stderr.flush()


def _write_status(rank, name, text):
    os.makedirs(STATUS_DIR, exist_ok=True)
    with open(os.path.join(STATUS_DIR, "rank_%s.%s" % (rank, name)), "w") as f:
        f.write(text + "\n")


# Where an Ascend node records its versions (MindFormers' run_check reads the same files): the driver's
# version.info has a `Version=25.5.0` line; the CANN toolkit's <toolkit>/<arch>-linux/
# ascend_toolkit_install.info a `version=8.5.0` line, and older toolkits' <toolkit>/version.cfg a
# `toolkit_running_version=[7.3.0.1.231:8.0.RC2]` line (inner version:release).
DRIVER_VERSION_FILE = "/usr/local/Ascend/driver/version.info"
TOOLKIT_DIRS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann")  # CANN up to 8.3, 8.5 on
# The console line that carries the versions too (a pod's output/ may go with it; its log is gathered).
VERSIONS_MARK = "launcher-versions: "


def read_key(path, key):
    """The value of the first `key=value` line of a file; None without one, or without the file."""
    try:
        with open(path, errors="replace") as f:
            for line in f:
                name, sep, value = line.partition("=")
                if sep and name.strip() == key and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def driver_version(path=DRIVER_VERSION_FILE):
    return read_key(path, "Version")


def cann_version(toolkit_dirs=None, arch=None):
    """The CANN toolkit's release: under $ASCEND_HOME_PATH (its set_env.sh sets it) first, then the defaults."""
    if toolkit_dirs is None:
        home = os.environ.get("ASCEND_HOME_PATH")
        toolkit_dirs = ((home,) if home else ()) + TOOLKIT_DIRS
    arch = arch or platform.machine()
    for root in toolkit_dirs:
        version = read_key(os.path.join(root, "%s-linux" % arch, "ascend_toolkit_install.info"), "version")
        if version:
            return version
        running = read_key(os.path.join(root, "version.cfg"), "toolkit_running_version")
        if running and running.startswith("[") and running.endswith("]"):
            return running[1:-1].rpartition(":")[2] or None
    return None


def package_version(name):
    """The installed distribution's version, else the module's __version__; None if neither is there."""
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:  # noqa: BLE001 - no metadata (Python 3.7, a checkout on sys.path): ask the module
        pass
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # noqa: BLE001 - not importable: the launcher records it as not found
        return None


def node_versions():
    found = {
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "mindspore": package_version("mindspore"),
        "mindformers": package_version("mindformers"),
        "cann": cann_version(),
        "driver": driver_version(),
    }
    return dict((k, v) for k, v in found.items() if v)


def write_versions(rank):
    """Record what this rank runs with in output/launcher/rank_N.versions.json and one console line.
    What is not found is left out, and nothing here may fail the rank."""
    try:
        text = json.dumps(node_versions(), sort_keys=True)
        print(VERSIONS_MARK + text, flush=True)
        path = os.path.join(STATUS_DIR, "rank_%s.versions.json" % rank)
        os.makedirs(STATUS_DIR, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    except Exception as exc:  # noqa: BLE001 - a missing record must not stop the training
        print("launcher: could not record the versions: %s" % exc, file=sys.stderr, flush=True)


def _use_cpu_overflow_check():
    """MindFormers' loss-scale wrapper reads NPU float-status registers; on CPU check the grads directly."""
    from mindspore import ops
    from mindspore.nn.wrap import loss_scale

    def overflow_status(self, status, compute_output):
        finite = tuple(ops.isfinite(grad).all() for grad in compute_output)
        return ops.logical_not(ops.stack(finite).all())

    loss_scale.TrainOneStepWithLossScaleCell.get_overflow_status = overflow_status


def _use_cpu_barrier():
    """MindFormers syncs the ranks with comm_func.barrier around checkpoint loading; it has no CPU kernel.

    On the CPU every rank reads the same whole checkpoint (the launcher refuses auto_trans there), so no
    rank waits for another's file and the barrier can be skipped.
    """
    from mindformers.trainer import utils as trainer_utils
    from mindformers.utils import load_checkpoint_utils

    def no_barrier(*args, **kwargs):
        return None

    trainer_utils.barrier = no_barrier
    load_checkpoint_utils.barrier = no_barrier


def register_model_modules(spec):
    """Import the modules that register a research model's classes, from the folder the job names."""
    if not spec:
        return
    folder, _, names = spec.partition(":")
    if not os.path.isdir(folder):
        raise SystemExit("launcher: the model's MindFormers research folder %s does not exist; check "
                         "mindformers.source (a MindFormers source checkout of the release the ranks run)" % folder)
    sys.path.insert(0, folder)
    for name in names.split(","):
        importlib.import_module(name)


def _finetune(trainer, checkpoint):
    """finetune() without an argument clears load_checkpoint; passing it loads those weights. MindFormers
    1.0-1.1 name the argument finetune_checkpoint, later releases resume_from_checkpoint (which with
    resume_training off, the rendered config's default, takes only the weights, not the step)."""
    parameters = inspect.signature(trainer.finetune).parameters
    key = "resume_from_checkpoint" if "resume_from_checkpoint" in parameters else "finetune_checkpoint"
    trainer.finetune(**{key: checkpoint or None})


def current_attempt():
    """The attempt of the run this rank belongs to: its run id ends in -a<k> from the second attempt on
    (launcher/attempts.py ATTEMPT_SUFFIX)."""
    run_id = os.environ.get("LAUNCHER_RUN_ID", "")
    head, sep, tail = run_id.rpartition("-a")
    return int(tail) if sep and tail.isdigit() else 1


def _fault_callbacks(rank):
    spec = os.environ.get("LAUNCHER_FAULT", "")
    if not spec:
        return []
    fields = spec.split(":")
    mode = fields[2] if len(fields) > 2 else "raise"
    numbers = fields[:2] + fields[3:]
    if not 2 <= len(fields) <= 4 or mode not in ("raise", "kill", "sleep") or not all(n.isdigit() for n in numbers):
        raise SystemExit("launcher: LAUNCHER_FAULT %r is not RANK:STEP[:raise|kill|sleep[:ATTEMPT]]" % spec)
    if int(fields[0]) != int(rank) or (len(fields) == 4 and int(fields[3]) != current_attempt()):
        return []
    fault_step = int(fields[1])
    from mindspore.train import Callback

    class FailAtStep(Callback):
        def on_train_step_end(self, run_context):
            # cur_step_num counts this process's steps; MindFormers' trainer puts the step it resumed
            # from in initial_step (mindformers r1.8.0 core/callback/callback.py MFLossMonitor adds it too).
            args = run_context.original_args()
            step = args.cur_step_num + (args.get("initial_step") or 0)
            if step < fault_step:
                return
            if mode == "kill":
                print("LAUNCHER_FAULT: rank %s sends itself SIGKILL at step %d as asked" % (rank, step), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "sleep":
                print("LAUNCHER_FAULT: rank %s stops making progress at step %d as asked" % (rank, step), flush=True)
                while True:
                    time.sleep(3600)
            raise RuntimeError("LAUNCHER_FAULT: rank %s fails at step %d as asked" % (rank, step))

    return [FailAtStep()]


def main(config_path):
    if os.environ.get("MS_ROLE") != "MS_SCHED":  # the scheduler runs no rank
        write_versions(os.environ.get("RANK_ID", "0"))
    from mindformers import Trainer, build_context
    from mindformers.tools.register import MindFormerConfig

    register_model_modules(os.environ.get("LAUNCHER_MODEL_MODULES", ""))
    config = MindFormerConfig(config_path)
    if str(config.context.device_target).upper() == "CPU":
        _use_cpu_overflow_check()
        _use_cpu_barrier()
    build_context(config)
    rank = os.environ.get("RANK_ID", "0")
    trainer = Trainer(
        args=config,
        task="text_generation",
        train_dataset=config.train_dataset.data_loader.dataset_dir,
        callbacks=_fault_callbacks(rank),
    )
    _finetune(trainer, config.load_checkpoint)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: finetune.py RUN_CONFIG.yaml")
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    threading.Thread(target=_watch_stacks_request, name="stacks request", daemon=True).start()
    is_scheduler = os.environ.get("MS_ROLE") == "MS_SCHED"
    rank_id = os.environ.get("RANK_ID", "0")
    if not is_scheduler:
        _write_status(rank_id, "pid", str(os.getpid()))
    try:
        main(sys.argv[1])
    except BaseException as exc:  # noqa: BLE001 - record any failure for the launcher, then re-raise
        if is_scheduler or isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        _write_status(rank_id, "exit", "1")
        sys.stdout.flush()
        sys.stderr.flush()
        # A normal exit would wait in MindSpore's cluster shutdown for peers that will never finish;
        # leave now so msrun (or the rank-table script) sees the failure at once.
        os._exit(1)
    if not is_scheduler:
        _write_status(rank_id, "exit", "0")
