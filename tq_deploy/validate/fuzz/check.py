"""One case through every runner: the rules of the package docstring, as findings."""

from __future__ import annotations

import warnings

from tq_deploy.validate.fuzz.agree import agree
from tq_deploy.validate.fuzz.case import Case, Finding
from tq_deploy.validate.fuzz.runners import OrtRunner, Refused, run_torch


def check_case(case: Case, ort: OrtRunner | None, device: str | None = None) -> list[Finding]:
    """Run ``case`` on the reference, ONNX Runtime and (``device="cuda"``) the PyTorch API on CUDA;
    the findings (module docstring), empty when every rule holds."""
    found = []

    def finding(kind, detail):
        found.append(Finding(case.index, case.op, kind, f"{detail} [{case.describe()}]"))

    want, ref_error = None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = run_torch(case, "cpu")
    except Refused as err:
        ref_error = err
        if not err.clear:
            finding("unclear-error", f"reference: {err}")
    except TypeError as err:
        if case.defect != "unknown-attribute":
            finding("unclear-error", f"reference raised TypeError: {err}")
    except Exception as err:  # noqa: BLE001 - anything but ValueError is a finding
        finding("unclear-error", f"reference raised {type(err).__name__}: {err}")
    if case.ref_refuses and want is not None:
        finding("accepted-invalid", f"reference accepted a call with defect {case.defect}")
    if not case.defect and ref_error is not None:
        finding("refused-valid", f"reference refused a valid call: {ref_error}")

    if ort is not None and ort.takes(case.op):
        try:
            got = ort(case)
        except Refused as err:
            if not err.clear:
                finding("unclear-error", f"onnxruntime: {err}")
            if not case.ort_refuses:
                finding("refused-valid", f"onnxruntime refused a call the reference takes: {err}")
        except Exception as err:  # noqa: BLE001
            finding("unclear-error", f"onnxruntime raised {type(err).__name__}: {err}")
        else:
            if case.ort_refuses:
                finding("accepted-invalid", f"onnxruntime accepted a call with defect {case.defect}")
            elif want is not None:
                problem = agree(case, got, want)
                if problem:
                    finding("mismatch", f"onnxruntime vs reference: {problem}")

    if device and device != "cpu":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = run_torch(case, device)
        except Refused as err:
            if not err.clear:
                finding("unclear-error", f"{device}: {err}")
            if not case.defect:
                finding("refused-valid", f"{device} refused a valid call: {err}")
        except TypeError:
            pass
        except Exception as err:  # noqa: BLE001
            finding("unclear-error", f"{device} raised {type(err).__name__}: {err}")
        else:
            if case.ref_refuses and not case.data_defect:
                finding("accepted-invalid", f"{device} accepted a call with defect {case.defect}")
            elif not case.defect and want is not None:
                problem = agree(case, got, want, gpu=True)
                if problem:
                    finding("mismatch", f"{device} vs reference: {problem}")
    return found
