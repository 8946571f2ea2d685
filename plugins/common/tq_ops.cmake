# GENERATED from tq_deploy/ops.py by `python -m tq_deploy.export.op_tables --native plugins/common`: do not edit.
# tests/test_export.py fails when it drifts from the specs. Each op's sources are named by its stem:
# kernels/cpu/tq_<stem>.cc, kernels/cuda/tq_<stem>.cu, ort/tq_<stem>_op.cc, trt/tq_<stem>_plugin.cc.
set(TQ_OP_STEMS encode decode cache_update paged_attention paged_prefill)
