"""rvpo-async: asynchronous multi-reward RL post-training of LLMs with RVPO.

The package root imports nothing heavy, so `rvpo_async.algo` stays importable without Ray, vLLM,
DeepSpeed or transformers.
"""

__version__ = "0.1.0"
