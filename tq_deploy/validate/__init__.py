"""Validation of exported models against the PyTorch reference.

    random_inputs(model, seed)         valid inputs from the model's stored config (inputs.py)
    reference_outputs(model, inputs)   what the reference says the model outputs (reference.py)
    compare(actual, expected)          per-output errors -> ComparisonReport (compare.py)
    validate_with_ort(model_path)      all three with an ONNX Runtime session (ort.py)
    fuzz(seed, cases)                  seeded bad and odd calls, ORT and the PyTorch API vs the reference (fuzz.py)
    soak(steps)                        a long IO-bound decode loop: memory flat, end state right (long_run.py)
"""
