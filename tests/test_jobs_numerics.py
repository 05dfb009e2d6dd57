"""jobs/numerics.py: a non-finite latent or pixel ends its generation with the step named, and no
image made after it is given out, although the checks are read only once per VAE decode — also
when the pipeline gives a decode's images out two UNet forwards after it (as on CUDA)."""

from __future__ import annotations

import pytest

from jobs.numerics import NonFiniteError, generate_finite
from sdcore import GenerationRequest

SETTINGS = dict(sampler="ddim", steps=4, guidance_scale=5.0, width=32, height=32)


@pytest.fixture(params=[0, 2], ids=["given-out-at-once", "given-out-2-forwards-later"])
def pipe(tiny_pipe, request):
    """The tiny pipeline, giving out a decode's images at once (as on a CPU) or two UNet
    forwards later (as on CUDA: sdcore.pipeline.GIVE_OUT_LAG)."""
    tiny_pipe.give_out_lag = request.param
    yield tiny_pipe
    tiny_pipe.give_out_lag = None


def poison_forward(pipe, number: int):
    """A hook making the UNet's `number`-th forward (1-based) return NaN for every row."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == number else output

    return pipe.unet.register_forward_hook(hook)


def given_out_until_poisoned(pipe, rows: int, fixed_batch: int, poisoned: int) -> list[int]:
    """The rows given out by a stream whose `poisoned`-th UNet forward returns NaN, which must
    end it with NonFiniteError naming that forward as the step."""
    requests = [GenerationRequest(f"row {k}", seed=k) for k in range(rows)]
    handle = poison_forward(pipe, poisoned)
    given_out = []
    try:
        with pytest.raises(NonFiniteError, match=rf"non-finite values at step {poisoned} \(UNet output\)"):
            for index, _image, _ in generate_finite(pipe, requests, fixed_batch=fixed_batch, **SETTINGS):
                given_out.append(index)
    finally:
        handle.remove()
    return given_out


@pytest.mark.parametrize("forward", [1, 3, 4])
def test_a_nan_forward_is_named_by_its_step_and_no_image_comes_out(pipe, forward):
    # every row shares the poisoned forward: none is given out
    assert given_out_until_poisoned(pipe, rows=3, fixed_batch=4, poisoned=forward) == []


def test_rows_decoded_before_the_nan_are_given_out_and_later_ones_are_not(pipe):
    """One row per forward (fixed_batch 1): the first row's four forwards are clean and it is
    decoded and given out (with the lag, after the poisoned forward has run: its check is not
    the first row's); the second row's first forward, the stream's 5th, goes non-finite: the
    stream stops there. (Steps count the stream's forwards: isolation.py then retries the row
    alone, where they are the row's own.)"""
    assert given_out_until_poisoned(pipe, rows=2, fixed_batch=1, poisoned=5) == [0]


def test_clean_generations_give_every_image(pipe):
    requests = [GenerationRequest(f"row {k}", seed=k) for k in range(3)]
    made = {index for index, _image, _ in generate_finite(pipe, requests, fixed_batch=2, **SETTINGS)}
    assert made == {0, 1, 2}
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
