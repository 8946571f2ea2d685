#!/usr/bin/env python3
"""Run an exported model in ONNX Runtime with the custom-op library: same as `tq-deploy run ...`.

    python scripts/run_ort.py model.onnx [--inputs x.npz] [--providers CPUExecutionProvider] [--repeat 20]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_deploy.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
