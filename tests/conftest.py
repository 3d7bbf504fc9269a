"""Shared fixtures: the tiny local model (built once per session) and a local Ray instance."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from rvpo_async.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), seed=0))


@pytest.fixture
def ray_local():
    """A local Ray instance shared by the tests that need one (started on first use).

    Tests that need a cluster of their own (multi-node) call ray.shutdown() first; the next user of this
    fixture starts a fresh one.
    """
    yield _start_ray()


@pytest.fixture(scope="module")
def ray_module():
    """The same local Ray instance, for module-scoped fixtures (an actor started once per module)."""
    yield _start_ray()


def _start_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
                 log_to_driver=True, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                                                               "TOKENIZERS_PARALLELISM": "false"}})
    return ray


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
