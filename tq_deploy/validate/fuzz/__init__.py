"""Seeded fuzzing of the TurboQuant ops: ONNX Runtime's kernels and the PyTorch API against the reference.

    tq-deploy fuzz --seed 0 --cases 300                      # the CI-sized run (seconds)
    tq-deploy fuzz --seed 7 --cases 100000 --json fuzz.json  # a long run
    tq-deploy fuzz --seed 7 --cases 5000 --device cuda       # also the PyTorch API on CUDA tensors

Every op of the contract (:data:`tq_deploy.ops.ALL_OPS`) is fuzzed. Case ``i`` of seed ``s`` is drawn
from its own generator (``s``, ``i``), so any case can be replayed alone (``--first i --cases 1``).
A case is one op call: random shapes (zero-size dims, head dims
that are not multiples of 8, any block size), attributes and values (NaN, +-inf, zero vectors,
1e20s and 1e-30s, garbage code bytes with padding bits set, block tables whose unused entries
hold junk, negative and repeated slots, NaN norms in unused slots); about a third of the cases
carry one defect that makes the call invalid (a wrong rank, size, dtype, an out-of-range
context length, block-table entry or slot, a bit width outside 1-8, a bad scale, an unknown or
wrongly typed attribute, a descending or NaN codebook).

What a case must do (docs/ops.md, "Bad input"):

* the reference (:mod:`tq_deploy.dispatch` on CPU tensors, i.e. the PyTorch API) returns, or
  raises ``ValueError`` with "expected" in its message: any other exception is an unclear error;
* ONNX Runtime (CPU EP, the project's custom-op library, through
  :func:`tq_deploy.runtime.session.make_session`) refuses exactly the calls the reference refuses,
  with an error naming the op, an input or an attribute, and on every valid call agrees with the
  reference (codes identical except adjacent codes at rounding ties, norms to 2e-6, attention and
  decode to 1e-4 relative per row, the same rows NaN or infinite);
* with ``device="cuda"``, the PyTorch API on CUDA tensors (CUDA/Triton kernels) refuses the same
  metadata errors and agrees with the reference on valid calls (fp16-level tolerances); data it
  cannot check without a synchronization may go unrefused, but must not crash;
* nothing crashes and nothing hangs: cases run in a child process per batch (a segfault or abort
  ends only the child; the batch is then re-run one case per process to name the case), and each
  batch has a timeout.

The package, one job per module: :mod:`.case` (a case, a finding, the ops covered), :mod:`.draw`
(drawing cases), :mod:`.defects` (invalid calls), :mod:`.runners` (the PyTorch API and ONNX
Runtime), :mod:`.agree` (outputs against the reference), :mod:`.check` (one case through every
runner), :mod:`.driver` (child processes), :mod:`.cli` (a child's entry); the command line is
``tq-deploy fuzz`` (tq_deploy/commands/fuzz.py).
"""

from __future__ import annotations

from tq_deploy.validate.fuzz.agree import CACHE, agree, close_rows, codes_agree
from tq_deploy.validate.fuzz.case import Case, Finding, all_ops, stem
from tq_deploy.validate.fuzz.check import check_case
from tq_deploy.validate.fuzz.cli import op_names
from tq_deploy.validate.fuzz.defects import DEFECTS, add_defect, defects_of
from tq_deploy.validate.fuzz.draw import DRAWERS, coverage, draw_case
from tq_deploy.validate.fuzz.driver import FuzzReport, fuzz
from tq_deploy.validate.fuzz.runners import (ONNX_TYPES, OrtRunner, Refused, node_model, ort_kernels_missing,
                                              run_torch)

__all__ = ["CACHE", "Case", "DEFECTS", "DRAWERS", "Finding", "FuzzReport", "ONNX_TYPES", "OrtRunner", "Refused",
           "add_defect", "agree", "all_ops", "check_case", "close_rows", "codes_agree", "coverage", "defects_of",
           "draw_case", "fuzz", "node_model", "op_names", "ort_kernels_missing", "run_torch", "stem"]
