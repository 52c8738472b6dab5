"""What runs inside one rank: load the rendered MindFormers config and fine-tune with Trainer.

It is copied into every plan (entrypoint/finetune.py), so nodes need MindSpore and MindFormers
but not the launcher. Usage: python finetune.py run.yaml  (under msrun, or with the rank-table env).

Environment it reads:
  RANK_ID          global rank (set by msrun or by the rank-table script)
  MS_ROLE          MS_SCHED for MindSpore's dynamic-cluster scheduler, which only coordinates
  LAUNCHER_FAULT   "RANK:STEP" makes that rank fail at that step: a drill for teardown paths
  LAUNCHER_MODEL_MODULES  "DIR:mod,mod": a research model's folder and the modules that register its
                   classes (MindFormers only registers them when they are imported)
"""

import importlib
import inspect
import os
import sys
import traceback

STATUS_DIR = os.path.join("output", "launcher")


def _write_status(rank, name, text):
    os.makedirs(STATUS_DIR, exist_ok=True)
    with open(os.path.join(STATUS_DIR, "rank_%s.%s" % (rank, name)), "w") as f:
        f.write(text + "\n")


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


def _fault_callbacks(rank):
    spec = os.environ.get("LAUNCHER_FAULT", "")
    if not spec:
        return []
    fault_rank, fault_step = (int(x) for x in spec.split(":"))
    if fault_rank != int(rank):
        return []
    from mindspore.train import Callback

    class FailAtStep(Callback):
        def on_train_step_end(self, run_context):
            step = run_context.original_args().cur_step_num
            if step >= fault_step:
                raise RuntimeError("LAUNCHER_FAULT: rank %s fails at step %d as asked" % (rank, step))

    return [FailAtStep()]


def main(config_path):
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
