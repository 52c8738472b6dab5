"""`launcher ckpt filter|merge|merge-lora`: on small checkpoints made here, on real tiny Llama models,
and end to end on a real 2-rank LoRA run. MindSpore is real everywhere."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import EXAMPLES, REPO, run_launcher

from launcher.ckpt import merge as ckpt
from launcher.ckpt import lora as ckpt_lora
from launcher.errors import ConfigError, LauncherError

ms = pytest.importorskip("mindspore")

TRAINING_STATE = {
    "adam_m.model.w": np.ones((4, 4), np.float32),
    "adam_v.model.w": np.ones((4, 4), np.float32),
    "accu_grads.model.w": np.ones((4, 4), np.float32),
    "scale_sense": np.array(1.0, np.float32),
    "global_step": np.array([16], np.int32),
    "loss_scale": np.array(1.0, np.float32),
    "epoch_num": np.array(1, np.int64),
    "step_num": np.array(16, np.int64),
    "current_iterator_step": np.array(16, np.int32),
    "last_overflow_iterator_step": np.array(0, np.int32),
    "global_batch_size": np.array(4, np.int64),
}


def save(params: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    return path


def load(path: Path) -> dict:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def fake_run(root: Path, per_rank: list[dict], parallel=None, pet=None, run_id="r-20260101-000000") -> Path:
    """A gathered run as launcher up leaves it: run.json, plan/mindformers/run.yaml, ranks/rank_N/checkpoint/."""
    run_dir = root / "runs" / run_id
    model_config = {"pet_config": pet} if pet else {}
    cfg = {"parallel_config": parallel or {"data_parallel": len(per_rank), "model_parallel": 1, "pipeline_stage": 1},
           "model": {"model_config": model_config}}
    (run_dir / "plan" / "mindformers").mkdir(parents=True)
    (run_dir / "plan" / "mindformers" / "run.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id}))
    for rank, params in enumerate(per_rank):
        save(params, run_dir / "ranks" / f"rank_{rank}" / "checkpoint" / f"net_rank_{rank}-1_16.ckpt")
    return run_dir


def model_params(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"model.w": rng.standard_normal((4, 4)).astype(np.float32),
            "model.norm": rng.standard_normal(4).astype(np.float32)}


# ---- filter ----

def test_filter_keeps_the_model_and_drops_every_training_state_key(tmp_path):
    model = model_params()
    run_dir = fake_run(tmp_path, [{**model, **TRAINING_STATE}] * 2)
    rows = ckpt.filter_run(run_dir)
    assert [r.rank for r in rows] == [0, 1]
    for r in rows:
        assert r.dest == run_dir / "filtered" / f"rank_{r.rank}" / f"net_rank_{r.rank}-1_16.ckpt"
        got = load(r.dest)
        assert sorted(got) == sorted(model)
        for k, v in model.items():
            np.testing.assert_array_equal(got[k], v)
        assert r.dropped == len(TRAINING_STATE)
        assert r.size_before == r.source.stat().st_size and r.size_after == r.dest.stat().st_size
        assert r.size_after < r.size_before
    assert not list(run_dir.glob(".*partial"))


def test_filter_cli_prints_sizes_and_refuses_to_overwrite(tmp_path):
    run_dir = fake_run(tmp_path, [{**model_params(), **TRAINING_STATE}])
    first = run_launcher("ckpt", "filter", run_dir.name, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (run_dir / "ranks/rank_0/checkpoint/net_rank_0-1_16.ckpt").stat().st_size
    after = (run_dir / "filtered/rank_0/net_rank_0-1_16.ckpt").stat().st_size
    row = next(line for line in first.stdout.splitlines() if "net_rank_0-1_16.ckpt" in line)
    assert f"{before} B" in row and f"{after} B" in row and str(len(TRAINING_STATE)) in row

    again = run_launcher("ckpt", "filter", run_dir.name, cwd=tmp_path)
    assert again.returncode == 2
    assert "filtered/ already exists; pass --force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    forced = run_launcher("ckpt", "filter", run_dir.name, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


# ---- merge: data parallel ----

def test_merge_data_parallel_takes_rank0_model_only_with_sha256(tmp_path):
    model = model_params()
    run_dir = fake_run(tmp_path, [{**model, **TRAINING_STATE}] * 2)
    merged = ckpt.merge_run(run_dir)
    assert merged.path == run_dir / "merged" / "net-1_16.ckpt"
    assert not merged.from_filtered  # filtered on the fly: no filtered/ yet
    got = load(merged.path)
    assert sorted(got) == sorted(model)
    check = subprocess.run(["sha256sum", "-c", "net-1_16.ckpt.sha256"], cwd=merged.path.parent,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "OK" in check.stdout
    with pytest.raises(ConfigError, match="merged/ already exists"):
        ckpt.merge_run(run_dir)
    ckpt.filter_run(run_dir)
    assert ckpt.merge_run(run_dir, force=True).from_filtered


def test_merge_data_parallel_names_the_parameter_that_differs(tmp_path):
    model = model_params()
    drifted = {**model, "model.norm": model["model.norm"] + np.float32(1e-3)}
    run_dir = fake_run(tmp_path, [model, model, drifted])
    with pytest.raises(LauncherError, match=r"rank 2 differ.*model\.norm by 0\.001"):
        ckpt.merge_run(run_dir)
    assert not (run_dir / "merged").exists()
    assert ckpt.merge_run(run_dir, atol=2e-3).params == 2
    extra = fake_run(tmp_path, [model, {**model, "model.extra": np.zeros(2, np.float32)}], run_id="r2")
    with pytest.raises(LauncherError, match=r"only in rank 1: \['model.extra'\]"):
        ckpt.merge_run(extra)


def test_merge_cli_exit_codes(tmp_path):
    model = model_params()
    run_dir = fake_run(tmp_path, [model, {**model, "model.w": model["model.w"] * 2}])
    bad = run_launcher("ckpt", "merge", run_dir.name, cwd=tmp_path)
    assert bad.returncode == 1 and "model.w" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_launcher("ckpt", "merge", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


# ---- merge: sharded, with strategy files ----

def write_strategy(path: Path, layouts: dict, dev_matrix: list[int], stage: int = 0) -> None:
    """A protobuf strategy file as MindSpore saves it (mindspore/train/node_strategy_pb2.py):
    per parameter its device matrix and tensor map (-1: not split; k: split by dev_matrix[-1-k])."""
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    smap = ParallelStrategyMap()
    smap.current_stage = stage
    op = smap.parallel_strategy_item.add()
    op.node_name = f"MatMul-stage{stage}"
    op.parallel_strategys.stage = stage
    op.parallel_strategys.parallel_strategy.add().dim.extend(dev_matrix)
    for name, tensor_map in layouts.items():
        item = smap.parallel_layout_item.add()
        item.param_name = name
        layout = item.parallel_layouts
        layout.dev_matrix.add().dim.extend(dev_matrix)
        layout.tensor_map.add().dim.extend(tensor_map)
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field, layout.opt_weight_shard_step, layout.opt_weight_shard_size = 0, 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(smap.SerializeToString())


def test_merge_model_parallel_from_strategy_files(tmp_path):
    rng = np.random.default_rng(1)
    full = {"model.wq.weight": rng.standard_normal((8, 6)).astype(np.float32),  # split on dim 0 (column)
            "model.wo.weight": rng.standard_normal((6, 8)).astype(np.float32),  # split on dim 1 (row)
            "model.norm.weight": rng.standard_normal(6).astype(np.float32)}     # replicated
    maps = {"model.wq.weight": [0, -1], "model.wo.weight": [-1, 0], "model.norm.weight": [-1]}
    shards = [{"model.wq.weight": np.split(full["model.wq.weight"], 2, 0)[r],
               "model.wo.weight": np.split(full["model.wo.weight"], 2, 1)[r],
               "model.norm.weight": full["model.norm.weight"],
               "adam_m.model.wq.weight": np.zeros((4, 6), np.float32), "global_step": np.array([3], np.int32)}
              for r in range(2)]
    run_dir = fake_run(tmp_path, shards, parallel={"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1})
    with pytest.raises(ConfigError, match="no strategy files"):
        ckpt.merge_run(run_dir)
    for r in range(2):
        write_strategy(run_dir / f"ranks/rank_{r}/strategy/ckpt_strategy_rank_{r}.ckpt", maps, [1, 2])
    merged = ckpt.merge_run(run_dir)
    got = load(merged.path)
    assert sorted(got) == sorted(full)
    for name, value in full.items():
        np.testing.assert_array_equal(got[name], value)
    assert "strategy file ranks/rank_0/strategy/ckpt_strategy_rank_0.ckpt" in merged.how


def test_merge_pipeline_stages_merges_their_strategies(tmp_path):
    # 2 stages × model_parallel 2: ranks 0-1 hold the first layer's halves, ranks 2-3 the second's.
    rng = np.random.default_rng(2)
    first, second = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    shards = [{"layers.0.w": np.split(first, 2, 0)[r]} for r in range(2)]
    shards += [{"layers.1.w": np.split(second, 2, 1)[r]} for r in range(2)]
    run_dir = fake_run(tmp_path, shards, parallel={"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 2})
    for r in range(4):
        stage = r // 2
        layouts = {"layers.0.w": [0, -1]} if stage == 0 else {"layers.1.w": [-1, 0]}
        write_strategy(run_dir / f"ranks/rank_{r}/strategy/ckpt_strategy_rank_{r}.ckpt", layouts, [1, 2], stage)
    merged = ckpt.merge_run(run_dir)
    got = load(merged.path)
    np.testing.assert_array_equal(got["layers.0.w"], first)
    np.testing.assert_array_equal(got["layers.1.w"], second)
    assert "2 pipeline stages" in merged.how


# ---- merge-lora: real tiny Llama models ----

TINY_LORA = REPO / "configs" / "mindformers" / "tiny_llama" / "lora.yaml"


def tiny_models(lora: bool):
    """LlamaForCausalLM of the tiny CPU config, float32, eval mode; with lora, wrapped by get_pet_model
    as MindFormers does for a pet_config (mindformers/pet/pet_model.py)."""
    from mindformers import LlamaConfig, LlamaForCausalLM
    from mindformers.pet import get_pet_model

    cfg = yaml.safe_load(TINY_LORA.read_text())["model"]["model_config"]
    cfg.pop("type")
    pet = cfg.pop("pet_config")
    net = LlamaForCausalLM(LlamaConfig(**cfg))
    if lora:
        net = get_pet_model(net, dict(pet))
    net.set_train(False)
    return net, pet


def logits(net, tokens) -> np.ndarray:
    return net(ms.Tensor(tokens, ms.int32))[0].asnumpy()


def test_merged_lora_gives_the_logits_of_base_plus_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MindFormers writes output/ (logs, adapter_config.json) in the cwd
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    base_net, _ = tiny_models(lora=False)
    base_ckpt = tmp_path / "base.ckpt"
    ms.save_checkpoint(base_net, str(base_ckpt))

    lora_net, pet = tiny_models(lora=True)
    ms.load_param_into_net(lora_net, ms.load_checkpoint(str(base_ckpt)))
    # B starts at zero, where folding changes nothing; give A and B values as after training.
    rng = np.random.default_rng(3)
    adapter = {}
    for p in lora_net.get_parameters():
        if "mindpet_delta_lora" in p.name:
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
            adapter[p.name] = p.asnumpy()
    assert len(adapter) == 16
    tokens = rng.integers(0, 256, (2, 32))
    expected = logits(lora_net, tokens)
    assert np.abs(expected - logits(base_net, tokens)).max() > 1e-2  # the adapter matters

    # A run whose merged checkpoint holds the adapter, next to frozen weights and training state.
    run_dir = fake_run(tmp_path, [], pet=pet)
    save({**{k: v.asnumpy() for k, v in ms.load_checkpoint(str(base_ckpt)).items()}, **adapter,
          "global_step": np.array([16], np.int32)}, run_dir / "merged" / "llama_tiny-1_16.ckpt")
    folded = ckpt_lora.merge_lora(run_dir, base_ckpt)
    assert folded.layers == 8 and folded.rank == 4 and folded.alpha == 8 and folded.base_differs == []
    params = ms.load_checkpoint(str(folded.path))
    assert sorted(params) == sorted(ms.load_checkpoint(str(base_ckpt)))  # no LoRA, no training state

    plain, _ = tiny_models(lora=False)
    not_loaded, _ = ms.load_param_into_net(plain, params)
    assert not_loaded == []
    np.testing.assert_allclose(logits(plain, tokens), expected, atol=1e-4, rtol=0)


def test_merge_lora_refusals(tmp_path):
    run_dir = fake_run(tmp_path, [model_params()])
    base = save(model_params(), tmp_path / "base.ckpt")
    with pytest.raises(ConfigError, match="not a LoRA run"):
        ckpt_lora.merge_lora(run_dir, base)
    lora_run = fake_run(tmp_path, [model_params()], pet={"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4},
                        run_id="lora-1")
    with pytest.raises(ConfigError, match="ckpt merge lora-1"):
        ckpt_lora.merge_lora(lora_run, base)
    adapter = save({"model.q.mindpet_delta_lora_a": np.ones((2, 4), np.float32),
                    "model.q.mindpet_delta_lora_b": np.ones((4, 2), np.float32)}, tmp_path / "adapter.ckpt")
    with pytest.raises(ConfigError, match="no model.q.weight"):
        ckpt_lora.merge_lora(lora_run, base, adapter)


# ---- end to end: a real 2-rank LoRA run ----

@pytest.mark.e2e
def test_ckpt_commands_on_a_real_lora_run(tmp_path, tiny_run):
    run_dir = tiny_run  # the tiny example's run, in tmp_path/runs
    rank0 = next((run_dir / "ranks/rank_0/checkpoint").glob("*.ckpt"))
    trained = load(rank0)
    # The base is the run's own frozen weights; test_e2e_pipeline.py starts a run from a saved base instead.
    base = save({k: v for k, v in trained.items() if not ckpt.is_training_state(k) and "lora" not in k},
                tmp_path / "base.ckpt")

    filtered = run_launcher("ckpt", "filter", run_dir.name, cwd=tmp_path)
    assert filtered.returncode == 0, filtered.stderr
    for rank in (0, 1):
        src = next((run_dir / f"ranks/rank_{rank}/checkpoint").glob("*.ckpt"))
        dest = run_dir / "filtered" / f"rank_{rank}" / src.name
        row = next(line for line in filtered.stdout.splitlines() if src.name in line)
        assert f"{src.stat().st_size / 1024:.1f} KiB" in row and f"{dest.stat().st_size / 1024:.1f} KiB" in row
        assert not any(ckpt.is_training_state(k) for k in load(dest))

    merged = run_launcher("ckpt", "merge", run_dir.name, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert "data parallel: 2 ranks agree" in merged.stdout
    merged_file = run_dir / "merged" / "llama_tiny-1_16.ckpt"
    got = load(merged_file)
    assert sorted(got) == sorted(k for k in trained if not ckpt.is_training_state(k))

    folded = run_launcher("ckpt", "merge-lora", run_dir.name, "--base", base, cwd=tmp_path)
    assert folded.returncode == 0, folded.stderr
    assert "folded 8 LoRA layers" in folded.stdout and "r=4, alpha=8" in folded.stdout
    assert "warning" not in folded.stderr
    out = load(run_dir / "merged-lora" / "llama_tiny-1_16.ckpt")
    assert sorted(out) == sorted(load(base))
    wq = "model.layers.0.attention.wq"
    expected = got[f"{wq}.weight"] + 2.0 * got[f"{wq}.mindpet_delta_lora_b"] @ got[f"{wq}.mindpet_delta_lora_a"]
    np.testing.assert_allclose(out[f"{wq}.weight"], expected, atol=1e-6)
    assert not np.allclose(out[f"{wq}.weight"], got[f"{wq}.weight"])  # training moved B off zero
    for sub in ("merged", "merged-lora"):
        check = subprocess.run("sha256sum -c *.sha256", shell=True, cwd=run_dir / sub, capture_output=True,
                               text=True, check=False)
        assert check.returncode == 0 and ": OK" in check.stdout, check.stdout + check.stderr

    refused = run_launcher("ckpt", "merge-lora", run_dir.name, "--base", base, cwd=tmp_path)
    assert refused.returncode == 2 and "--force" in refused.stderr
    shutil.rmtree(run_dir / "merged-lora")


def test_gather_puts_each_ranks_strategy_file_under_its_rank():
    from launcher import gather
    from launcher.plan import build_plan
    from launcher.spec import load_job

    plan = build_plan(load_job(str(EXAMPLES / "llama2-7b-lora-1x8-ranktable.yaml")))
    paths = [f"output/strategy/ckpt_strategy_rank_{r}.ckpt" for r in range(plan.world_size)]
    paths += ["output/strategy/ckpt_strategy_rank_10.ckpt"]  # another job's rank 10 must not land in rank_1
    wanted = [w for w in gather.wanted_from_paths(plan, paths) if "/strategy/" in w.dest]
    assert sorted((w.rank, w.dest) for w in wanted) == [
        (r, f"ranks/rank_{r}/strategy/ckpt_strategy_rank_{r}.ckpt") for r in range(plan.world_size)]


# ---- streaming: every dtype kept, memory about one parameter ----

def test_filter_copies_every_dtype_bit_for_bit(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    params = [{"name": "model.bf16", "data": ms.Tensor(w).astype(ms.bfloat16)},
              {"name": "model.fp16", "data": ms.Tensor(w.astype(np.float16))},
              {"name": "model.ids", "data": ms.Tensor(np.arange(5, dtype=np.int64))},
              {"name": "adam_m.model.bf16", "data": ms.Tensor(w)},
              {"name": "global_step", "data": ms.Tensor(np.array([3], np.int32))}]
    run_dir = fake_run(tmp_path, [])
    src = run_dir / "ranks/rank_0/checkpoint/net_rank_0-1_16.ckpt"
    src.parent.mkdir(parents=True)
    ms.save_checkpoint(params, str(src))
    (row,) = ckpt.filter_run(run_dir)
    assert row.dropped == 2
    got, before = ms.load_checkpoint(str(row.dest)), ms.load_checkpoint(str(src))
    assert list(got) == ["model.bf16", "model.fp16", "model.ids"]
    for name, value in got.items():
        ref = before[name]
        assert value.dtype == ref.dtype
        if value.dtype == ms.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value, ref = value.astype(ms.float32), ref.astype(ms.float32)
        assert value.asnumpy().tobytes() == ref.asnumpy().tobytes()


def test_merge_data_parallel_accepts_another_parameter_order(tmp_path):
    model = model_params()
    run_dir = fake_run(tmp_path, [model, dict(reversed(model.items()))])
    assert ckpt.merge_run(run_dir).params == 2


def test_merge_compares_piece_by_piece(tmp_path, monkeypatch):
    from launcher.ckpt import stream

    monkeypatch.setattr(stream, "PIECE_BYTES", 16)  # 4 float32 a piece: model.w is read in 4 pieces
    model = model_params()
    drifted = {**model, "model.w": model["model.w"].copy()}
    drifted["model.w"][3, 3] += np.float32(0.5)  # in the last piece
    with pytest.raises(LauncherError, match=r"1 parameter\(s\) of rank 1 differ.*most model\.w by 0\.5"):
        ckpt.merge_run(fake_run(tmp_path, [model, drifted]))
    for dtype in (np.float32, np.float16, np.float64):  # NaN equals nothing, as before
        nan = {**model, "model.norm": np.array([0, 0, 0, np.nan], dtype)}
        with pytest.raises(LauncherError, match=r"1 parameter\(s\).*most model\.norm by inf"):
            ckpt.merge_run(fake_run(tmp_path, [nan, nan], run_id=f"r-nan-{np.dtype(dtype).name}"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_merge_lora_folds_like_the_whole_file_fold(tmp_path, dtype):
    """Each weight as the former load_checkpoint fold made it: float64 W + scale·B·A, through float32, cast by
    MindSpore to W's dtype; a [in, out] weight takes the transpose; frozen weights that differ are named."""
    rng = np.random.default_rng(5)
    ms_type = getattr(ms, dtype)
    r, alpha = 2, 3.0
    wq, wo = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    a, b = rng.standard_normal((r, 4)).astype(np.float32), rng.standard_normal((6, r)).astype(np.float32)
    base = {"model.q.weight": wq, "model.o.weight": wo, "model.norm": np.ones(4, np.float32)}
    base_path = tmp_path / "base.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v).astype(ms_type)} for k, v in base.items()], str(base_path))
    adapter = {"model.norm": np.full(4, 2, np.float32), "model.q.weight": wq,
               "model.q.mindpet_delta_lora_a": a, "model.q.mindpet_delta_lora_b": b,
               "model.o.mindpet_delta_lora_a": a, "model.o.mindpet_delta_lora_b": b,
               "adam_m.model.q.mindpet_delta_lora_a": a}
    run_dir = fake_run(tmp_path, [], pet={"pet_type": "lora", "lora_rank": r, "lora_alpha": alpha})
    adapter_path = save(adapter, tmp_path / "adapter.ckpt")
    folded = ckpt_lora.merge_lora(run_dir, base_path, adapter_path)
    assert folded.layers == 2 and folded.path == run_dir / "merged-lora" / "adapter.ckpt"
    loaded_base = ms.load_checkpoint(str(base_path))
    # in the adapter's order; a wq rounded to 16 bits in the base is no longer the adapter's float32 wq
    assert folded.base_differs == ["model.norm"] + (["model.q.weight"] if dtype != "float32" else [])
    got = ms.load_checkpoint(str(folded.path))
    assert list(got) == list(base)

    def old_fold(w, delta):
        w64 = (w.astype(ms.float32) if w.dtype == ms.bfloat16 else w).asnumpy().astype(np.float64)
        return ms.Tensor((w64 + delta).astype(np.float32)).astype(w.dtype)

    delta = (b.astype(np.float64) @ a.astype(np.float64)) * (alpha / r)
    expected = {"model.q.weight": old_fold(loaded_base["model.q.weight"], delta),
                "model.o.weight": old_fold(loaded_base["model.o.weight"], delta.T),
                "model.norm": loaded_base["model.norm"]}
    for name, value in expected.items():
        assert got[name].dtype == ms_type
        np.testing.assert_array_equal(got[name].astype(ms.float32).asnumpy(), value.astype(ms.float32).asnumpy())


def test_ckpt_commands_hold_about_one_parameter_in_memory(tmp_path):
    """filter, merge and merge-lora on checkpoints of 1 MiB parameters, 48 MiB a file with the moments: the
    Python heap (numpy included) holds a few parameters at most (buffers, float64 blocks), a whole-file load
    holds the file."""
    import tracemalloc

    layer = np.ones((256, 1024), np.float32)  # 1 MiB
    model = {f"model.layers.{i}.wq.weight": layer * i for i in range(16)}
    lora = {}
    for i in range(16):
        lora[f"model.layers.{i}.wq.mindpet_delta_lora_a"] = np.full((2, 1024), 0.01, np.float32)
        lora[f"model.layers.{i}.wq.mindpet_delta_lora_b"] = np.full((256, 2), 0.02, np.float32)
    moments = {f"adam_{m}.{k}": v for m in "mv" for k, v in model.items()}
    run_dir = fake_run(tmp_path, [{**model, **lora, **moments}] * 2, pet={"pet_type": "lora", "lora_rank": 2,
                                                                          "lora_alpha": 4})
    base = save(model, tmp_path / "base.ckpt")
    peaks = {}
    tracemalloc.start()
    try:
        for tool, run in (("filter", lambda: ckpt.filter_run(run_dir)), ("merge", lambda: ckpt.merge_run(run_dir)),
                          ("merge-lora", lambda: ckpt_lora.merge_lora(run_dir, base))):
            tracemalloc.reset_peak()
            start, _ = tracemalloc.get_traced_memory()
            run()
            peaks[tool] = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert (run_dir / "merged-lora" / "net-1_16.ckpt").stat().st_size > 16 * layer.nbytes
    assert (run_dir / "ranks/rank_0/checkpoint/net_rank_0-1_16.ckpt").stat().st_size > 48 * layer.nbytes
    assert all(peak < 8 * layer.nbytes for peak in peaks.values()), peaks
