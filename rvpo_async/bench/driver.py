"""Driver CPU seconds per trained sample: the driver process's CPU time (all its threads) over a 10-step and a
40-step run of the embedded default after a warm-up run; the difference cancels start-up. Runs against
whichever checkout is on PYTHONPATH (BENCHMARKS.md compares two commits):
`PYTHONPATH=$PWD python -m rvpo_async.bench.driver`."""

import tempfile
import time

from rvpo_async.config import load_config
from rvpo_async.driver import train

def cpu(steps, out):
    cfg = load_config("configs/tiny-cpu.yaml", [f"run.steps={steps}", f"run.output_dir={out}", "run.overwrite=true",
                                                "run.progress=false", "checkpoint.every=0", "metrics.enabled=false"])
    c0 = time.process_time()
    r = train(cfg)
    return time.process_time() - c0, r["samples_trained"]

if __name__ == "__main__":
    d = tempfile.mkdtemp()
    cpu(4, d + "/w")  # warm-up: imports and one-time set-up of this process
    (c1, s1), (c2, s2) = cpu(10, d + "/a"), cpu(40, d + "/b")
    print(f"driver CPU: 10 steps {c1:.2f} s, 40 steps {c2:.2f} s; per trained sample {1000 * (c2 - c1) / (s2 - s1):.3f} ms")
