"""The float64 NumPy reference the unit tests check rvpo_async.algo against; it lives in rvpo_async/reference.py
(the `bench algo` baseline too). Imported here as `reference` / `ref`."""

from rvpo_async.reference import *  # noqa: F401,F403
from rvpo_async.reference import EPS  # noqa: F401
