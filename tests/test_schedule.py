"""The flow-matching schedule: the published step lists, the parity fixture's sigmas, x0 and re-noising."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from worldgen.schedule import make_schedule, predict_x0, renoise, shifted_sigmas

V1_INDICES = (0, 179, 358, 679)


@pytest.mark.parametrize(("shift", "timesteps"), [(10.0, (999, 978, 947, 825)), (5.0, (999, 957, 899, 702))])
def test_published_step_lists(shift: float, timesteps: tuple[int, ...]) -> None:
    schedule = make_schedule(V1_INDICES, shift)
    assert schedule.timesteps == timesteps
    assert len(schedule) == 4


def test_sigmas_match_parity_fixture(shared_dir) -> None:
    fixture = json.loads((shared_dir / "parity" / "dit_io.json").read_text())
    schedule = make_schedule(fixture["timestep_indices"], fixture["shift"])
    assert list(schedule.timesteps) == fixture["timesteps"]
    np.testing.assert_allclose(schedule.sigmas, fixture["sigmas"], rtol=1e-14, atol=0)


def test_sigma_table_formula() -> None:
    unshifted = 0.999 * (1 - np.arange(1000) / 1000)
    np.testing.assert_allclose(shifted_sigmas(1.0), unshifted, rtol=0, atol=1e-15)
    shift = 3.0
    expected = shift * unshifted / (1 + (shift - 1) * unshifted)
    np.testing.assert_allclose(shifted_sigmas(shift), expected, rtol=0, atol=1e-15)
    sigma = make_schedule((500,), shift).sigmas[0]
    assert sigma == pytest.approx(expected[500], rel=1e-14)
    assert make_schedule((500,), shift).timesteps[0] == math.floor(expected[500] * 1000)


def test_x0_then_renoise_walks_the_flow_path() -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = make_schedule(V1_INDICES, 10.0).sigmas[1]

    x = renoise(x0, noise, sigma)
    torch.testing.assert_close(x, (1 - sigma) * x0 + sigma * noise, rtol=0, atol=0)
    # The flow model's target velocity is noise - x0; with it, x0 comes back exactly up to float32 rounding.
    recovered = predict_x0(x, noise - x0, sigma)
    assert recovered.dtype == torch.float32
    torch.testing.assert_close(recovered, x0, rtol=0, atol=2e-6)


def test_x0_is_computed_in_float64() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, generator=generator)
    velocity = torch.randn(64, generator=generator)
    sigma = 0.9785457712127179
    expected = (x.numpy().astype(np.float64) - sigma * velocity.numpy().astype(np.float64)).astype(np.float32)
    assert torch.equal(predict_x0(x, velocity, sigma), torch.from_numpy(expected))
    assert predict_x0(x.double(), velocity, sigma).dtype == torch.float64


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ((), "must not be empty"),
        ((0, 1000), r"\[0, 1000\)"),
        ((-1, 5), r"\[0, 1000\)"),
        ((0, 179, 179), "strictly increasing"),
        ((179, 0), "strictly increasing"),
        ((0, 1.5), "integers"),
        ((True, 5), "integers"),
    ],
)
def test_bad_indices(indices: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_schedule(indices, 10.0)


@pytest.mark.parametrize("shift", [0.0, -5.0, math.nan, math.inf])
def test_bad_shift(shift: float) -> None:
    with pytest.raises(ValueError, match="shift must be"):
        make_schedule(V1_INDICES, shift)
