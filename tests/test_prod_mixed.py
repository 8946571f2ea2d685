"""TurboQuant_prod (unbiased inner products) and mixed precision (issue item 6, second half)."""

from __future__ import annotations

import math

import pytest
import torch

from tq_deploy.reference.codebook import expected_mse
from tq_deploy.reference.quantizer import MixedPrecisionTurboQuant, TurboQuantMSE, TurboQuantProd

DIM = 64
DRAWS = 400


def inner_product_errors(make_quantizer, q: torch.Tensor, x: torch.Tensor, base_seed: int) -> torch.Tensor:
    """<q, x_hat> - <q, x> over DRAWS independent quantizers (new rotation / projection each)."""
    exact = float(q.double() @ x.double())
    errors = [float(q.double() @ make_quantizer(base_seed + i).quantize(x).double()) - exact for i in range(DRAWS)]
    return torch.tensor(errors, dtype=torch.float64)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_prod_is_unbiased_while_mse_shrinks_inner_products(bits, gen, seed, single_thread):
    x = torch.randn(DIM, generator=gen)
    q = x + 0.5 * torch.randn(DIM, generator=gen)  # correlated with x: a large <q, x>
    exact = float(q.double() @ x.double())
    base = seed % 100_000 * DRAWS

    prod = inner_product_errors(lambda s: TurboQuantProd(DIM, bits, seed=s), q, x, base)
    sigma = float(prod.std()) / math.sqrt(DRAWS)
    assert abs(float(prod.mean())) < 4 * sigma, (float(prod.mean()), sigma)
    # Variance bound of the QJL stage (paper, Lemma 4): Var <= pi / (2 d) ||q||^2 E||r||^2 <= pi/(2d) ||q||^2 ||x||^2.
    assert float(prod.var()) <= 1.2 * math.pi / (2 * DIM) * float(q.norm() ** 2 * x.norm() ** 2)

    # TurboQuant_mse at the same bits: E[x_hat] = (1 - D_mse) x over Haar rotations (each centroid is
    # its cell's mean, so E<y, c(y)> = E|c(y)|^2 = 1 - D_mse), a bias of -D_mse <q, x>.
    mse = inner_product_errors(lambda s: TurboQuantMSE(DIM, bits, seed=s), q, x, base)
    mse_sigma = float(mse.std()) / math.sqrt(DRAWS)
    expected_bias = -expected_mse(DIM, bits) * exact
    assert float(mse.mean()) * math.copysign(1, exact) < -8 * mse_sigma  # clearly biased, towards 0
    assert abs(float(mse.mean()) - expected_bias) < 5 * mse_sigma + 0.02 * abs(expected_bias)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_structure_and_inner_product(bits, gen):
    p = TurboQuantProd(DIM, bits, seed=3)
    if bits == 1:
        assert p.mse is None
    else:
        assert p.mse.bits == bits - 1
    x = torch.randn(5, DIM, generator=gen, dtype=torch.float16)
    codes = p.encode(x)
    assert codes.qjl_signs.dtype == torch.uint8 and codes.qjl_signs.shape == (5, DIM // 8)
    assert codes.residual_norms.shape == (5,) and codes.norms.shape == (5,)
    x_hat = p.quantize(x)
    assert x_hat.dtype == torch.float16 and x_hat.shape == x.shape
    q = torch.randn(5, DIM, generator=gen)
    torch.testing.assert_close(p.inner_product(q, codes), (q * p.decode(codes)).sum(-1))
    # The residual norm is ||x - x_hat_mse||, the QJL bits its projected signs.
    residual = x.float() - (p.mse.quantize(x.float()) if p.mse else 0)
    torch.testing.assert_close(codes.residual_norms, residual.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_mixed_precision_presets_and_effective_bits():
    m25 = MixedPrecisionTurboQuant.preset(128, 2.5)
    assert m25.effective_bits == 2.5
    assert (m25.outlier_channels, m25.outlier.bits, m25.regular.bits) == (64, 3, 2)
    m35 = MixedPrecisionTurboQuant.preset(128, 3.5)
    assert m35.effective_bits == 3.5 and (m35.outlier.bits, m35.regular.bits) == (4, 3)
    assert MixedPrecisionTurboQuant(128, 32, 3, 2).effective_bits == (32 * 3 + 96 * 2) / 128 == 2.25
    with pytest.raises(ValueError, match=r"effective_bits=3.0, expected one of 1.5, 2.5, 3.5"):
        MixedPrecisionTurboQuant.preset(128, 3.0)
    with pytest.raises(ValueError, match=r"outlier_channels=127, expected 2..126"):
        MixedPrecisionTurboQuant(128, 127, 3, 2)


def with_outliers(gen, num: int, dim: int, channels: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    x = torch.randn(num, dim, generator=gen)
    x[:, channels] *= scale
    return x


@pytest.mark.parametrize("n_out", [8, 32, 64])
def test_planted_outlier_channels_are_picked(n_out, gen):
    dim = 128
    planted = torch.randperm(dim, generator=gen)[:n_out]
    x = with_outliers(gen, 200, dim, planted)
    m = MixedPrecisionTurboQuant(dim, n_out, 3, 2)
    outlier, regular = m.split_channels(x)
    assert outlier.tolist() == sorted(planted.tolist())
    assert sorted(outlier.tolist() + regular.tolist()) == list(range(dim))
    # Leading dimensions are pooled: a [2, 100, D] batch picks the same channels.
    assert m.split_channels(x.reshape(2, 100, dim))[0].tolist() == sorted(planted.tolist())


def test_mixed_quantize_composes_the_two_quantizers(gen):
    dim = 128
    planted = torch.randperm(dim, generator=gen)[:64]
    x = with_outliers(gen, 100, dim, planted)
    m = MixedPrecisionTurboQuant.preset(dim, 2.5, seed=9)
    out = m.quantize(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    idx = planted.sort().values
    rest = torch.tensor(sorted(set(range(dim)) - set(idx.tolist())))
    torch.testing.assert_close(out[:, idx], TurboQuantMSE(64, 3, seed=9).quantize(x[:, idx]))
    torch.testing.assert_close(out[:, rest], TurboQuantMSE(64, 2, seed=10).quantize(x[:, rest]))


def test_fixed_outlier_indices_override_the_data(gen):
    dim = 64
    fixed = torch.tensor([1, 5, 9, 60])
    m = MixedPrecisionTurboQuant(dim, 4, 4, 1, outlier_idx=fixed)
    x = with_outliers(gen, 50, dim, torch.tensor([0, 2, 3, 4]))  # outliers elsewhere
    assert m.split_channels(x)[0].tolist() == [1, 5, 9, 60]


@pytest.mark.parametrize("low", [2, 3])
def test_mixed_error_between_its_two_bit_widths_on_outlier_data(low, gen):
    dim = 128
    planted = torch.randperm(dim, generator=gen)[:16]
    x = with_outliers(gen, 2000, dim, planted, scale=4.0)  # outliers dominate, regular channels still count

    def relative_error(quantize) -> float:
        return float((quantize(x) - x).pow(2).sum() / x.pow(2).sum())

    e_low = relative_error(TurboQuantMSE(dim, low, seed=1).quantize)
    e_high = relative_error(TurboQuantMSE(dim, low + 1, seed=1).quantize)
    e_mixed = relative_error(MixedPrecisionTurboQuant.preset(dim, low + 0.5, seed=1).quantize)
    assert e_high < e_mixed < e_low, (e_high, e_mixed, e_low)
    # The outliers carry most of the energy and get the extra bit: closer to the high end.
    assert e_mixed - e_high < e_low - e_mixed


@pytest.mark.parametrize("bad", [[1, 2, 3], [1, 2, 3, 3], [1, 2, 3, 200], [-70, 1, 2, 3]],
                         ids=["too-few", "duplicate", "out-of-range", "negative"])
def test_fixed_outlier_indices_are_validated(bad):
    """A wrong ``outlier_idx`` must be refused up front, naming outlier_idx, the value and what is
    expected (4 distinct channels in 0..63): today it surfaces later as a misleading
    'x.shape[-1]=3, expected head_dim=4', or as an IndexError."""
    with pytest.raises(ValueError) as info:
        m = MixedPrecisionTurboQuant(64, 4, 3, 2, outlier_idx=torch.tensor(bad))
        m.quantize(torch.randn(3, 64))
    message = str(info.value)
    assert "outlier_idx" in message and "4" in message and "63" in message, message
