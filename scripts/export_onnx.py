#!/usr/bin/env python3
"""Export the TurboQuant decode model (or one op) to ONNX: same as `tq-deploy export ...`.

    python scripts/export_onnx.py --out model.onnx [--op TQEncode] [--bits 4] [--head-dim 128] ...
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_deploy.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["export", *sys.argv[1:]]))
