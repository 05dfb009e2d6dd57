"""jobs/numerics.py: a non-finite latent or pixel ends its generation with the step named, and no
image made after it is given out, although the checks are read only once per VAE decode."""

from __future__ import annotations

import pytest

from jobs.numerics import NonFiniteError, generate_finite
from sdcore import GenerationRequest

SETTINGS = dict(sampler="ddim", steps=4, guidance_scale=5.0, width=32, height=32)


def poison_forward(pipe, number: int):
    """A hook making the UNet's `number`-th forward (1-based) return NaN for every row."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == number else output

    return pipe.unet.register_forward_hook(hook)


@pytest.mark.parametrize("forward", [1, 3, 4])
def test_a_nan_forward_is_named_by_its_step_and_no_image_comes_out(tiny_pipe, forward):
    requests = [GenerationRequest(f"row {k}", seed=k) for k in range(3)]
    handle = poison_forward(tiny_pipe, forward)
    given_out = []
    try:
        with pytest.raises(NonFiniteError, match=rf"non-finite values at step {forward} \(UNet output\)"):
            for index, _image, _ in generate_finite(tiny_pipe, requests, fixed_batch=4, **SETTINGS):
                given_out.append(index)
    finally:
        handle.remove()
    assert given_out == []  # every row shared the poisoned forward: none is given out


def test_rows_decoded_before_the_nan_are_given_out_and_later_ones_are_not(tiny_pipe):
    """One row per forward (fixed_batch 1): the first row's four forwards are clean and it is
    decoded and given out; the second row's first forward, the stream's 5th, goes non-finite:
    the stream stops there. (Steps count the stream's forwards: isolation.py then retries the
    row alone, where they are the row's own.)"""
    requests = [GenerationRequest(f"row {k}", seed=k) for k in range(2)]
    handle = poison_forward(tiny_pipe, 5)
    given_out = []
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite values at step 5 \(UNet output\)"):
            for index, _image, _ in generate_finite(tiny_pipe, requests, fixed_batch=1, **SETTINGS):
                given_out.append(index)
    finally:
        handle.remove()
    assert given_out == [0]


def test_clean_generations_give_every_image(tiny_pipe):
    requests = [GenerationRequest(f"row {k}", seed=k) for k in range(3)]
    made = {index for index, _image, _ in generate_finite(tiny_pipe, requests, fixed_batch=2, **SETTINGS)}
    assert made == {0, 1, 2}
    assert not tiny_pipe.unet._forward_hooks and not tiny_pipe.unet._forward_pre_hooks
