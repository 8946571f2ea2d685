#!/usr/bin/env python3
"""Compare an exported model in ONNX Runtime with the PyTorch reference: `tq-deploy run MODEL --compare ...`.

    python scripts/compare.py model.onnx [--inputs x.npz] [--seed 3] [--json]

Exits 1 when an output is outside tolerance. (For export + run + compare in one
go on the default model use `tq-deploy pipeline`.)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_deploy.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["run", "--compare", "--repeat", "1", *sys.argv[1:]]))
