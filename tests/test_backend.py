"""The backend switch: Triton only on CUDA tensors, and never when the reference is forced."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tq_deploy import backend
from tq_deploy.reference.quantizer import TurboQuantMSE


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


def test_cpu_tensors_never_use_triton(no_env):
    x = torch.randn(4, 64)
    assert backend.selected() == "auto"
    assert backend.use_triton(x) is False
    assert backend.use_triton(x, x.to(torch.uint8)) is False
    assert backend.use_triton() is False
    assert backend.use_triton(None) is False


def test_triton_availability_is_detected():
    assert backend.triton_available() == (importlib.util.find_spec("triton") is not None)


def test_force_reference_nests_and_restores_after_errors(no_env):
    assert backend.selected() == "auto"
    with backend.force_reference():
        assert backend.selected() == "reference"
        with backend.force_reference():
            assert backend.selected() == "reference"
        assert backend.selected() == "reference"
        assert backend.use_triton(torch.zeros(2)) is False
    assert backend.selected() == "auto"
    with pytest.raises(RuntimeError):
        with backend.force_reference():
            raise RuntimeError("boom")
    assert backend.selected() == "auto"


@pytest.mark.parametrize("value,expected", [("reference", "reference"), (" Reference ", "reference"),
                                            ("auto", "auto"), ("", "auto")])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("TQ_DEPLOY_BACKEND", value)
    assert backend.selected() == expected
    assert backend.use_triton(torch.zeros(2)) is False


def test_invalid_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("TQ_DEPLOY_BACKEND", "cuda")
    with pytest.raises(ValueError) as info:
        backend.selected()
    assert "TQ_DEPLOY_BACKEND='cuda'" in str(info.value) and "'auto'" in str(info.value) and "'reference'" in str(info.value)


def test_forced_reference_gives_the_same_result_on_cpu(no_env):
    q = TurboQuantMSE(64, 3, seed=1)
    x = torch.randn(10, 64)
    codes, norms = q.encode(x)
    with backend.force_reference():
        forced = q.encode(x)
    assert torch.equal(codes, forced[0]) and torch.equal(norms, forced[1])


@pytest.mark.gpu
def test_cuda_tensors_use_triton_unless_forced(monkeypatch, no_env):
    x = torch.zeros(2, device="cuda")
    assert backend.use_triton(x) is backend.triton_available()
    assert backend.use_triton(x, torch.zeros(2)) is False  # mixed devices: the reference
    with backend.force_reference():
        assert backend.use_triton(x) is False
    monkeypatch.setenv("TQ_DEPLOY_BACKEND", "reference")
    assert backend.use_triton(x) is False


@pytest.mark.gpu
def test_shapes_the_kernels_do_not_take_fall_back_to_the_reference(no_env):
    x = torch.zeros(2, device="cuda")
    assert backend.use_triton(x, head_dim=100, bits=(4,)) is False  # Triton takes D in 32/64/128/256
    q = TurboQuantMSE(100, 3, device="cuda")
    v = torch.randn(7, 100, device="cuda")
    codes, norms = q.encode(v)
    with backend.force_reference():
        expected = q.encode(v)
    assert torch.equal(codes, expected[0]) and torch.allclose(norms, expected[1])
