"""monitor.tensorboard: MindFormers writes TensorBoard events for each rank, and gather brings them into
runs/<id>/tensorboard/rank_N/, listed in manifest.json. The e2e test reads them back with TensorBoard's
own reader and compares the loss curve with the one in the rank's info.log."""

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, up_tiny_job

from launcher import gather
from launcher.errors import ConfigError
from launcher.plan import CONFIG_PATH, build_plan
from launcher.spec import parse_job

WORLD = 2  # the example's two data-parallel ranks


def tiny_job(example="tiny-lora-local.yaml", **sections) -> dict:
    data = yaml.safe_load((EXAMPLES / example).read_text())
    data.update(sections)
    return data


def rendered_config(data: dict) -> dict:
    return yaml.safe_load(build_plan(parse_job(data)).artifacts[CONFIG_PATH])


def test_the_rendered_config_turns_on_mindformers_tensorboard():
    cfg = rendered_config(tiny_job(monitor={"tensorboard": True}))
    # mindformers r1.8.0 trainer/base_trainer.py (training_process) opens the writer when
    # config.tensorboard.tensorboard_dir is a string, in os.path.join(tensorboard_dir, f"rank_{rank_id}");
    # utils/tensorboard.py reads tensorboard_queue_size. The path is relative to the node's work directory,
    # beside output_dir.
    assert cfg["tensorboard"] == {"tensorboard_dir": "./output/tensorboard", "tensorboard_queue_size": 10}
    assert cfg["output_dir"] == "./output"
    assert "tensorboard" not in rendered_config(tiny_job())
    assert "tensorboard" not in rendered_config(tiny_job(monitor={"tensorboard": False}))


def test_a_release_without_tensorboard_is_refused():
    # Its image (images/matrix.yaml) carries MindFormers 1.0.2, from before mindformers/utils/tensorboard.py.
    job = tiny_job("baichuan2-7b-lora-4dev-docker.yaml", monitor={"tensorboard": True})
    with pytest.raises(ConfigError, match=r"^monitor.tensorboard: MindFormers 1.0.2 \(image.entry\)"):
        build_plan(parse_job(job))


def test_gather_puts_each_rank_s_events_in_its_own_directory():
    plan = build_plan(parse_job(tiny_job(monitor={"tensorboard": True})))
    paths = [f"output/tensorboard/rank_{r}/events.out.tfevents.{r}.host" for r in (0, 1, 10)]
    paths.append("output/tensorboard/stray")
    wanted = [(w.rank, w.source, w.dest) for w in gather.wanted_from_paths(plan, paths)]
    assert wanted == [
        (0, paths[0], "tensorboard/rank_0/events.out.tfevents.0.host"),
        (1, paths[1], "tensorboard/rank_1/events.out.tfevents.1.host"),
    ]


@pytest.fixture
def tensorboard_run(tmp_path, tiny_dataset) -> tuple[Path, float]:
    """A real tiny run with monitor.tensorboard, the one test here that needs it: (run directory, seconds
    `launcher up` took)."""
    started = time.monotonic()
    run_dir = up_tiny_job(tmp_path, tiny_dataset, monitor={"tensorboard": True})
    return run_dir, time.monotonic() - started


# MFLossMonitor's line (mindformers r1.8.0 core/callback/callback.py print_output_info):
#   { Epoch:[  1/  1], step:[    3/   16], loss:[5.548754/5.545023], ...   (loss: 5.548754, in sink mode)
# and its TensorBoard step is cur_step_num + (cur_epoch_num - 1) * steps_per_epoch.
_LOG_STEP = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*(\d+)\], loss:\s*\[?\s*([-+0-9.eE]+)")


def logged_losses(info_log) -> dict[int, float]:
    losses = {}
    for epoch, step, per_epoch, loss in _LOG_STEP.findall(info_log.read_text()):
        losses[int(step) + (int(epoch) - 1) * int(per_epoch)] = float(loss)
    return losses


def event_scalars(directory) -> dict[str, list]:
    """Every scalar series in a directory of event files, read by TensorBoard itself."""
    # MindSpore makes protobuf use its pure-Python implementation when it is imported
    # (mindspore/run_check/_check_version.py _set_pb_env): its generated _pb2 modules need it. Ask for it
    # before TensorBoard imports protobuf, or a later `import mindspore` in this process fails.
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


@pytest.mark.e2e
def test_tensorboard_events_are_gathered_and_hold_the_logged_losses(tensorboard_run):
    run_dir, seconds = tensorboard_run
    print(f"tiny run with monitor.tensorboard: {seconds:.1f} s")
    manifest = json.loads((run_dir / "manifest.json").read_text())["files"]
    for rank in range(WORLD):
        directory = run_dir / "tensorboard" / f"rank_{rank}"
        events = sorted(directory.iterdir())
        assert events and all(p.name.startswith("events.out.tfevents.") for p in events), events
        for path in events:
            entry = manifest[str(path.relative_to(run_dir))]
            assert entry["size"] == path.stat().st_size and entry["sha256"] == gather.sha256_file(path)

        expected = logged_losses(run_dir / "ranks" / f"rank_{rank}" / "log" / "info.log")
        assert len(expected) >= 2, expected
        written = {event.step: event.value for event in event_scalars(directory)["loss"]}
        assert sorted(written) == sorted(expected)
        for step, loss in expected.items():
            # The log prints 6 decimals of the float32 loss that TensorBoard stores.
            assert math.isclose(written[step], loss, rel_tol=2e-7, abs_tol=5e-7), (rank, step, written[step], loss)
    assert gather.verify_manifest(run_dir) == []
    assert not (run_dir / "tensorboard" / f"rank_{WORLD}").exists()
