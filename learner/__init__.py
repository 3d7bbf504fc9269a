"""The DeepSpeed learner, weight sync and checkpoints."""
