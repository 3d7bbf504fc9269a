"""`learner.shared_prefix` through a real DeepSpeed step: one rank (fp32) takes one optimizer step on batches of
groups (G responses to each prompt) with each distinct prompt run once and with the plain forward; the loss,
the importance weights, the KL to the reference model and the gradients agree to fp32 rounding, under ZeRO-2 and
ZeRO-3 (which gathers parameters in each of the path's forwards: the prompts', then one per length bucket of
responses; the probe makes every micro-batch split into several buckets).

Run in a child process (tests/rank_probe.py).
"""

from __future__ import annotations

import pytest

from rank_probe import run_rank_probe

pytestmark = [pytest.mark.slow]

PROBE = r"""
import json, os, sys
import torch
from learner.engine import DeepSpeedLearner
from rvpo_async.loss import make_loss_fn
from rvpo_async.config import Config
sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests", "unit"))
from test_learner_logprobs import grouped_batch

import learner.logprobs as lpm
lpm.BUCKET_OVERHEAD_TOKENS = 0  # the responses of each micro-batch run in several length buckets
bucket_counts = []
_buckets = lpm.length_buckets
lpm.length_buckets = lambda *a: bucket_counts.append(len(_buckets(*a))) or _buckets(*a)
model_dir = os.environ["MODEL_DIR"]
batch = grouped_batch(400, prompt_lens=[9, 7, 9, 11], group=4, max_resp=8, seed=4)
n = batch["input_ids"].shape[0]
g = torch.Generator().manual_seed(5)
batch.update(behaviour_logprobs=(-torch.rand(batch["input_ids"].shape, generator=g) * 2 - 5.5) * batch["response_mask"],
             advantages=torch.randn(n, generator=g), policy_version=torch.zeros(n, dtype=torch.long))
res = {}
for stage in (2, 3):
    out = {}
    for shared in (False, True):
        cfg = Config().override(f"learner.zero_stage={stage}", "learner.micro_batch_size=8", "learner.lr=1e-3",
                                f"learner.shared_prefix={str(shared).lower()}", "algo.kl_coef=0.1")
        learner = DeepSpeedLearner(model_dir, cfg.learner, seed=0)
        grads = {}
        def keep(opt, *_):  # the optimizer's own (under ZeRO, flat fp32) gradient tensors, the same layout in both runs
            for i, p in enumerate(q for group in opt.param_groups for q in group["params"]):
                grads[i] = p.grad.detach().clone()
        learner.base_optimizer().register_step_pre_hook(keep)
        plans = []
        bucket_counts.clear()
        orig = learner._plan
        learner._plan = lambda mb: plans.append(orig(mb)) or plans[-1]
        stats = learner.train_batch(batch, make_loss_fn(cfg.algo, 0.9))
        out[shared] = (stats, grads, [p is not None for p in plans], list(bucket_counts))
    (s0, g0, p0, _), (s1, g1, p1, buckets) = out[False], out[True]
    r = {k: [s0[k], s1[k]] for k in ("loss", "is_weight_mean", "is_weight_max", "clip_frac", "kl_behaviour", "kl_ref", "grad_norm")}
    r["plans"] = [p0, p1]
    r["buckets"] = buckets  # per forward of the shared run (the reference's, then the policy's)
    r["grad_max_abs_diff"] = max(float((g0[k] - g1[k]).abs().max()) for k in g0)
    r["grad_max_abs"] = max(float(g0[k].abs().max()) for k in g0)
    r["n_grads"] = len(g0)
    res[stage] = r
print("RESULT " + json.dumps(res))
"""


def test_a_deepspeed_step_with_each_prompt_run_once_equals_the_plain_forward_under_zero2_and_zero3(
        tiny_model_dir: str) -> None:
    res = run_rank_probe(PROBE, tiny_model_dir, range(21340, 21380))
    for stage, r in res.items():
        # the plain run took the plain forward; the shared run shared prompts in both micro-batches
        assert r["plans"] == [[False, False], [True, True]], (stage, r["plans"])
        assert len(r["buckets"]) == 4 and all(b > 1 for b in r["buckets"]), r["buckets"]  # ref + policy, 2 each
        for key in ("loss", "is_weight_mean", "is_weight_max", "clip_frac", "kl_behaviour", "kl_ref", "grad_norm"):
            a, b = r[key]
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (stage, key, a, b)
        assert r["kl_ref"][0] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial model
        assert r["n_grads"] > 0 and r["grad_max_abs"] > 0
        assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"], (stage, r)
