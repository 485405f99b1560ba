"""An ordinary Trainer script for benchmarks/gpu_smoke.py's launched steps: `_gpu_smoke_script.py SPEC.json` trains
the tiny Mixtral as the spec says (see _gpu_smoke_jobs.train_gpu); `hetermoe launch` runs it on the attention
ranks."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_smoke_jobs import train_gpu  # noqa: E402

if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        train_gpu(json.load(fh))
