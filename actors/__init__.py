"""Ray actors: vLLM rollout engines, judge workers and the group buffer."""
