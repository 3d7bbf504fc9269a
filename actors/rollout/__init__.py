"""Rollout: the vLLM engines that generate the groups (streaming.py: what a run uses; call.py: call-at-a-time,
the benchmark baseline) and the worker extension that loads new weights inside them (weight_receiver.py)."""
