"""The proximal log-probs without a separate forward: one real DeepSpeed rank (fp32) takes one optimizer step
on the same batch with `learner.recompute_proximal` off (the training forward's log-probs, detached) and on
(a separate no-grad forward first); loss, importance weights and gradients agree to 1e-6.

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
sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests", "ray"))
from test_learner import make_batch

model_dir = os.environ["MODEL_DIR"]
out = {}
for recompute in (False, True):
    cfg = Config().override("learner.zero_stage=0", "learner.micro_batch_size=5", "learner.lr=1e-3",
                            f"learner.recompute_proximal={str(recompute).lower()}", "learner.grad_clip=0")
    learner = DeepSpeedLearner(model_dir, cfg.learner, seed=0)
    grads = {}
    def keep(opt, *_):
        for name, p in learner.engine.module.named_parameters():
            grads[name] = p.grad.detach().clone()
    learner.engine.optimizer.register_step_pre_hook(keep)
    batch = make_batch(model_dir)  # 16 rows: micro-batches of 5, 5, 3, 3
    stats = learner.train_batch(batch, make_loss_fn(cfg.algo, 0.9))
    after = learner.export_state()
    out[recompute] = (stats, grads, after)
(s0, g0, w0), (s1, g1, w1) = out[False], out[True]
res = {k: [s0[k], s1[k]] for k in ("loss", "is_weight_mean", "is_weight_max", "clip_frac", "kl_behaviour", "grad_norm")}
res["grad_max_abs_diff"] = max(float((g0[n] - g1[n]).abs().max()) for n in g0)
res["grad_max_abs"] = max(float(g0[n].abs().max()) for n in g0)
res["weights_max_abs_diff"] = max(float((w0[n] - w1[n]).abs().max()) for n in w0)
res["n_grads"] = len(g0)
print("RESULT " + json.dumps(res))
"""


def test_training_forward_log_probs_give_the_loss_weights_and_gradients_of_a_separate_proximal_forward(
        tiny_model_dir: str) -> None:
    res = run_rank_probe(PROBE, tiny_model_dir, range(21300, 21340))
    for key in ("loss", "is_weight_mean", "is_weight_max", "clip_frac", "kl_behaviour", "grad_norm"):
        a, b = res[key]
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), (key, a, b)
    assert res["n_grads"] > 0 and res["grad_max_abs"] > 0
    assert res["grad_max_abs_diff"] <= 1e-6 * max(1.0, res["grad_max_abs"]), res
    assert res["weights_max_abs_diff"] <= 1e-6, res
