"""Closed-form fits from sufficient statistics: exactness, low-rank optimality, weighting."""

import numpy as np
import pytest

from subfit_onnx.calibration.fitting import fit_bypass
from subfit_onnx.calibration.stats import UnitStats


def _stats(x, y, h, weighting="uniform", batches=2, product_dtype=np.float64):
    st = UnitStats(x.shape[-1], y.shape[-1], weighting, product_dtype=product_dtype)
    for part in np.array_split(np.arange(x.shape[0]), batches):
        st.update(x[part], y[part], h[part])
    return st


def test_full_fit_recovers_exact_linear_map_and_bias():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40, 12))
    w, b = rng.normal(size=(12, 12)), rng.normal(size=12)
    y = x @ w + b
    st = _stats(x, y, rng.normal(size=x.shape) * 5)
    bypass, err = fit_bypass(st, ridge=0.0)
    np.testing.assert_allclose(bypass.weight, w, atol=1e-8)
    np.testing.assert_allclose(bypass.bias, b, atol=1e-8)
    assert err / st.y_energy < 1e-12


@pytest.mark.parametrize("ridge", [1e-3, 0.3])
def test_error_from_statistics_matches_direct_residual(ridge):
    """The error comes from the solved normal equations (``G W = C - s W``), so a large ridge ``s`` is checked too."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 30, 8))
    y = np.tanh(x @ rng.normal(size=(8, 8)))
    st = _stats(x, y, rng.normal(size=x.shape))
    for rank in (None, 3):
        bypass, err = fit_bypass(st, rank=rank, ridge=ridge)
        direct = float(((y - bypass.apply(x)) ** 2).sum())
        assert err == pytest.approx(direct, rel=1e-8)


def test_low_rank_fit_matches_truncated_svd_of_fitted_values():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 50, 10))
    y = x @ rng.normal(size=(10, 10)) + 0.1 * rng.normal(size=(8, 50, 10))
    st = _stats(x, y, rng.normal(size=x.shape))
    full, _ = fit_bypass(st, ridge=0.0)
    low, err = fit_bypass(st, rank=4, ridge=0.0)
    assert low.rank == 4 and low.num_params == 10 * 4 + 4 * 10 + 10
    # Reduced-rank regression: best rank-4 approximation of the (centred) fitted values.
    xc = x.reshape(-1, 10) - x.reshape(-1, 10).mean(0)
    u, s, vt = np.linalg.svd(xc @ full.weight, full_matrices=False)
    best = float(((y.reshape(-1, 10) - y.reshape(-1, 10).mean(0) - (u[:, :4] * s[:4]) @ vt[:4]) ** 2).sum())
    assert err == pytest.approx(best, rel=1e-6)


def test_stream_weighting_discounts_a_massive_token():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 32, 6))
    w = rng.normal(size=(6, 6))
    y = x @ w
    h = rng.normal(size=x.shape)
    y[:, 0] = 1000.0 * rng.normal(size=(4, 6))  # first token: huge, not linear in x
    h[:, 0] = 1e5
    uniform, _ = fit_bypass(_stats(x, y, h, "uniform"), ridge=0.0)
    stream, _ = fit_bypass(_stats(x, y, h, "stream"), ridge=0.0)
    assert np.abs(stream.weight - w).max() < 0.05 * np.abs(w).max()
    assert np.abs(uniform.weight - w).max() > 10 * np.abs(stream.weight - w).max()


def test_float32_batch_products_stay_within_1e_4_of_float64():
    """The default (float32 products per batch, float64 sums) against exact float64 arithmetic."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 64, 16))
    y = np.tanh(x @ rng.normal(size=(16, 16))) + 0.1 * rng.normal(size=(8, 64, 16))
    h = rng.normal(size=x.shape) * 30
    exact, err64 = fit_bypass(_stats(x, y, h, "stream", batches=4), ridge=1e-4)
    fast, err32 = fit_bypass(_stats(x, y, h, "stream", batches=4, product_dtype=np.float32), ridge=1e-4)
    assert np.abs(fast.weight - exact.weight).max() < 1e-4 * np.abs(exact.weight).max()
    assert err32 == pytest.approx(err64, rel=1e-4)


@pytest.mark.parametrize("weighting", ["uniform", "stream"])
def test_statistics_of_two_row_sets_add_up_to_those_of_all_rows(weighting):
    """How the weighting check's held-out rows join the winner's fits: batch by batch, the sum is the whole."""
    rng = np.random.default_rng(5)
    x, y, h = rng.normal(size=(6, 10, 8)), rng.normal(size=(6, 10, 8)), rng.normal(size=(6, 10, 8)) * 3
    whole = _stats(x, y, h, weighting, batches=3)
    first, rest = _stats(x[:4], y[:4], h[:4], weighting, batches=2), _stats(x[4:], y[4:], h[4:], weighting, batches=1)
    first.held_out_part().update(x[4:], y[4:], h[4:])
    for joined in (first + rest, first.with_held_out()):
        np.testing.assert_allclose(joined.gram, whole.gram, rtol=1e-12)
        np.testing.assert_allclose(joined.cross, whole.cross, rtol=1e-12)
        for name in ("tokens", "weight_sum", "y_energy", "stream_energy", "turn_sum", "growth_sum", "kept_error"):
            assert getattr(joined, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    with pytest.raises(ValueError, match="do not add"):
        first + _stats(x, y, h, "uniform" if weighting == "stream" else "stream")


@pytest.mark.parametrize("rank", [None, 3])
def test_torch_thread_pool_fits_equal_numpy_fits(rank):
    """The PyTorch backend solves on torch's pool (``TORCH_LINALG``); the fit must not depend on where it ran."""
    from subfit_onnx.calibration.torch_backend import TORCH_LINALG

    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 30, 8))
    y = np.tanh(x @ rng.normal(size=(8, 8)))
    st = _stats(x, y, rng.normal(size=x.shape) * 4, "stream")
    on_numpy, err_numpy = fit_bypass(st, rank=rank, ridge=1e-2)
    on_torch, err_torch = fit_bypass(st, rank=rank, ridge=1e-2, linalg=TORCH_LINALG)
    np.testing.assert_allclose(on_torch.apply(x), on_numpy.apply(x), rtol=1e-10, atol=1e-12)
    assert err_torch == pytest.approx(err_numpy, rel=1e-10)
