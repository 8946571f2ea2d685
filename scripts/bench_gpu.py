#!/usr/bin/env python3
"""GPU benchmark of the Triton kernels (see tq_deploy/triton/bench.py for what it measures).

    PYTHONPATH=. python3 scripts/bench_gpu.py [--quick] [--sweep 8x32768] [--json PATH]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_deploy.triton.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
