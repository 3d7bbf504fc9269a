"""GPU sharing: an engine's memory share may not exceed its Ray fraction, and the packing of fractions."""

from __future__ import annotations

import pytest

from rvpo_async.config import ConfigError, load_config
from rvpo_async.gpu_share import GpuShare, gpu_shares, memory_on_gpu, pack_gpus
from rvpo_async.placement import actor_options, gpu_plan

LLM_JUDGE = ("judges.specs=[{name: helpful, kind: llm, params: {rubric: 'Helpful?', mode: yesno}}]")
SHARED = ["rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.45", "judges.engine.num_gpus=0.25",
          "judges.engine.gpu_memory_utilization=0.25", "learner.num_gpus=0.25", LLM_JUDGE]


def test_rollout_judge_engine_and_learner_pack_onto_one_gpu_with_shares_summing_to_at_most_one():
    cfg = load_config(None, SHARED)
    shares = gpu_shares(cfg)
    assert [s.name for s in shares] == ["rollout-0", "judge-engine-default", "learner-0"]
    gpus = pack_gpus(shares, num_gpus=1)
    assert len(gpus) == 1 and gpu_plan(cfg, 1) == gpus
    assert sum(s.num_gpus for s in gpus[0]) == pytest.approx(1.0)
    assert memory_on_gpu(gpus[0]) == pytest.approx(0.45 + 0.25 + 0.25)
    # the Ray fractions handed to the actors are the configured ones
    assert actor_options("rollout", cfg)["num_gpus"] == 0.5
    assert actor_options("judge_engine", cfg)["num_gpus"] == 0.25
    assert actor_options("learner", cfg)["num_gpus"] == 0.25


@pytest.mark.parametrize("rubric, engines", [("{engine: default}", ["judge-engine-default"]),
                                             ("{engine: grader}", ["judge-engine-grader"]),
                                             ("{engine: null}", []), ("{base_url: 'http://127.0.0.1:1/v1', model: m}", [])])
def test_a_rubric_judge_engine_takes_its_gpu_share_unless_it_has_none(rubric, engines):
    cfg = load_config(None, SHARED[:-1] + [f"judges.specs=[{{name: r, kind: rubric, params: {rubric}}}]"])
    assert [s.name for s in gpu_shares(cfg) if s.key == "judges.engine"] == engines


@pytest.mark.parametrize("key,over", [
    ("rollout.gpu_memory_utilization", ["rollout.num_gpus=0.5"]),  # the default share 0.9 > 0.5
    ("judges.engine.gpu_memory_utilization", ["judges.engine.num_gpus=0.3", "judges.engine.gpu_memory_utilization=0.31"]),
])
def test_a_memory_share_above_the_engines_gpu_fraction_is_an_error_naming_both_keys(key, over):
    with pytest.raises(ConfigError) as e:
        load_config(None, over)
    msg = str(e.value)
    assert f"'{key}'" in msg and key.replace("gpu_memory_utilization", "num_gpus") in msg


@pytest.mark.parametrize("over,key", [(["rollout.gpu_memory_utilization=0"], "rollout.gpu_memory_utilization"),
                                      (["judges.engine.gpu_memory_utilization=1.2"], "judges.engine.gpu_memory_utilization"),
                                      (["learner.num_gpus=1.5"], "learner.num_gpus")])
def test_out_of_range_shares_name_their_key(over, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, over)


def test_whole_gpus_keep_the_default_share_and_a_gpu_each():
    cfg = load_config("configs/qwen2.5-1.5b-gpu.yaml")
    gpus = pack_gpus(gpu_shares(cfg))
    assert len(gpus) == 5 and all(len(g) == 1 for g in gpus)


def test_first_fit_decreasing_packing_and_the_error_when_gpus_run_out():
    s = [GpuShare(f"e{i}", "rollout", f, f) for i, f in enumerate([0.3, 0.6, 0.4, 0.7])]
    gpus = pack_gpus(s)
    assert [[x.name for x in g] for g in gpus] == [["e3", "e0"], ["e1", "e2"]]
    assert all(sum(x.num_gpus for x in g) <= 1 + 1e-9 for g in gpus)
    with pytest.raises(ValueError, match="need 2 GPUs, 1 available"):
        pack_gpus(s, num_gpus=1)


def test_engine_shares_reach_vllm_on_cuda_only(monkeypatch):
    import sys
    import types

    from actors import vllm_engine

    seen = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: seen.update(kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for cuda in (False, True):
        seen.clear()
        monkeypatch.setattr(vllm_engine, "on_cpu", lambda c=cuda: not c)
        vllm_engine.make_llm("m", kv_cache_memory_bytes=1 << 26, gpu_memory_utilization=0.4,
                             gpu_kv_cache_memory_bytes=1 << 30)
        if cuda:
            assert seen["gpu_memory_utilization"] == 0.4 and seen["kv_cache_memory_bytes"] == 1 << 30
        else:
            assert "gpu_memory_utilization" not in seen and seen["kv_cache_memory_bytes"] == 1 << 26


def test_gpu_check_plan_fits_one_gpu_and_the_command_exits_2_without_one(capsys):
    import torch

    from rvpo_async.cli import main
    from rvpo_async.gpu_check import SHARED_GPU

    cfg = load_config(None, SHARED_GPU + [LLM_JUDGE])
    gpus = pack_gpus(gpu_shares(cfg), num_gpus=1)
    assert memory_on_gpu(gpus[0]) <= 1.0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu-check would run")
    assert main(["gpu-check", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "no NVIDIA GPU" in err and "gpu extra" in err
