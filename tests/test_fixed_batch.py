"""Fixed-shape batching (sdcore/pipeline.py `fixed_batch`): every UNet forward runs the same number
of rows, so a row's bits depend on its own inputs and its slot, never on its neighbours; rebuilding
the forward with the row in its recorded slot and filler rows around it remakes the image exactly.
Continuous batching: a slot whose row finished takes the next row at once, so rows of other start
steps, step counts, samplers and guidance scales share forwards, each advancing on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdcore
from sdcore import GenerationRequest
from sdcore.config import ModelConfig
from sdcore.weights import assemble, random_parts


def picture(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def rows(size: int) -> list[GenerationRequest]:
    """Five rows: txt2img, and img2img at two strengths (other start steps)."""
    return [
        GenerationRequest("a red circle", seed=1),
        GenerationRequest("a blue square", seed=2, negative="green"),
        GenerationRequest("a star", seed=3, init_image=picture(3, size), strength=0.5),
        GenerationRequest("a yellow circle", seed=4),
        GenerationRequest("a square", seed=5, init_image=picture(5, size), strength=0.75),
    ]


@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(1)
    return sdcore.load_pipeline("builtin:shapes")


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "ddpm"])
def test_every_slot_reproduces_alone_with_fillers(shapes, sampler):
    settings = dict(sampler=sampler, steps=6, guidance_scale=5.0, width=64, height=64)
    batch = rows(64)
    forwards = []
    hook = shapes.unet.register_forward_pre_hook(lambda module, args: forwards.append(args[1].tolist()))
    try:
        placed = shapes.generate_placed(batch, fixed_batch=3, **settings)
    finally:
        hook.remove()
    # Rows 0-2 take the slots; row 2 (strength 0.5: 3 steps) finishes first and row 3 takes its
    # slot; rows 0 and 1 finish after 6 forwards and row 4 (0.75: 4 steps) takes slot 0; row 3
    # ends at forward 9, row 4 at 10. Grouping by start step instead would take 6 + 3 + 4 = 13.
    assert [(p.rows, p.slot) for _, p in placed] == [(3, 0), (3, 1), (3, 2), (3, 2), (3, 0)]
    assert len(forwards) == 10
    assert all(len(t) == 6 for t in forwards)  # 3 slots, each a guidance pair: one shape throughout
    for request, (image, placement) in zip(batch, placed):
        again = shapes.generate([request], fixed_batch=placement.rows, slots=[placement.slot], **settings)[0]
        assert np.array_equal(pixels(image), pixels(again)), request.prompt


def test_neighbours_do_not_change_a_rows_bits(shapes):
    """The same row in slot 1 of a 4-row forward, with other neighbours each time (other
    prompts, seeds, and an img2img neighbour at another strength in the same call)."""
    settings = dict(sampler="euler_a", steps=6, guidance_scale=7.5, width=64, height=64)
    row = GenerationRequest("a green triangle on the left", seed=11)
    seen = []
    for trial in range(3):
        neighbours = [GenerationRequest(f"neighbour {trial} {k}", seed=100 * trial + k) for k in range(3)]
        odd = GenerationRequest("other", seed=trial, init_image=picture(trial, 64), strength=0.3 + 0.2 * trial)
        batch = [neighbours[0], row, neighbours[1], neighbours[2], odd]
        placed = shapes.generate_placed(batch, fixed_batch=4, slots=[None, 1, None, None, None], **settings)
        assert placed[1][1].slot == 1
        seen.append(pixels(placed[1][0]))
    assert all(np.array_equal(seen[0], other) for other in seen[1:])


def test_rows_of_any_settings_share_forwards_and_reproduce_in_their_slots(shapes):
    """Other samplers, step counts, strengths, guidance scales (and an unguided row, which runs
    in forwards of its own shape) in one call of two slots: each row is remade alone in its slot."""
    settings = dict(sampler="ddim", steps=6, guidance_scale=5.0, width=64, height=64)
    batch = [
        GenerationRequest("a red circle", seed=1, sampler="euler_a", steps=5),
        GenerationRequest("a star", seed=2, init_image=picture(2, 64), strength=0.6, sampler="ddpm", steps=8),
        GenerationRequest("a blue square", seed=3, sampler="dpmpp_2m", karras=True, steps=4, guidance_scale=9.0),
        GenerationRequest("a green triangle", seed=4),
        GenerationRequest("unguided", seed=5, guidance_scale=1.0, steps=3),
        GenerationRequest("a square", seed=6, init_image=picture(6, 64), strength=0.3, sampler="euler_a"),
    ]
    forwards = []
    hook = shapes.unet.register_forward_pre_hook(lambda module, args: forwards.append(args[1].tolist()))
    try:
        placed = shapes.generate_placed(batch, fixed_batch=2, **settings)
    finally:
        hook.remove()
    # Some forward ran its two slots at different timesteps (rows at other points of their runs).
    assert any(len(t) == 4 and t[0] != t[1] and 0.0 not in t[:2] for t in forwards)
    assert sum(len(t) == 2 for t in forwards) == 3  # the unguided row: 3 forwards of 2 rows, alone
    for request, (image, placement) in zip(batch, placed):
        assert placement.rows == 2
        again = shapes.generate([request], fixed_batch=2, slots=[placement.slot], **settings)[0]
        assert np.array_equal(pixels(image), pixels(again)), request.prompt


def test_batched_decodes_run_at_one_shape_and_reproduce_in_their_decode_slots(shapes):
    """decode_batch=2: finished latents wait until two fill a VAE decode (the last one padded),
    whatever order the rows finish in; each image is remade alone in its UNet slot and its decode
    slot, and a row's pixels do not depend on its decode neighbours."""
    settings = dict(sampler="euler_a", steps=6, guidance_scale=5.0, width=64, height=64)
    batch = rows(64)
    decodes = []
    hook = shapes.vae.decoder.register_forward_pre_hook(lambda module, args: decodes.append(args[0].shape[0]))
    try:
        placed = shapes.generate_placed(batch, fixed_batch=3, decode_batch=2, **settings)
    finally:
        hook.remove()
    assert decodes == [2, 2, 2]  # five latents: two full decodes and a padded one
    # Row 2 (3 steps) finishes first and waits for a neighbour: rows 0 and 1 end together.
    assert [(p.decode_rows, p.decode_slot) for _, p in placed] == [(2, 1), (2, 0), (2, 0), (2, 1), (2, 0)]
    for request, (image, placement) in zip(batch, placed):
        again = shapes.generate(
            [request],
            fixed_batch=3,
            slots=[placement.slot],
            decode_batch=2,
            decode_slots=[placement.decode_slot],
            **settings,
        )[0]
        assert np.array_equal(pixels(image), pixels(again)), request.prompt
    # The same row, asked into decode slot 1 beside other neighbours.
    others = [GenerationRequest("another", seed=77), batch[3], GenerationRequest("more", seed=78)]
    again = shapes.generate_placed(
        others, fixed_batch=3, slots=[None, 2, None], decode_batch=2, decode_slots=[None, 1, None], **settings
    )[1]
    assert again[1] == placed[3][1] and np.array_equal(pixels(again[0]), pixels(placed[3][0]))
    # A stream may ask for decode slots without UNet slots.
    stream = shapes.generate_stream(iter(batch[:1]), fixed_batch=3, decode_batch=2, decode_slots=[1], **settings)
    assert [placement.decode_slot for _, _, placement in stream] == [1]


def test_the_stream_reads_rows_only_as_slots_free(shapes):
    """As on a CPU (on CUDA a lane reads one batch ahead: tests/test_pipeline.py)."""
    shapes.prepare_ahead = False
    settings = dict(sampler="ddim", steps=2, guidance_scale=5.0, width=64, height=64)
    read = []

    def requests():
        for k in range(5):
            read.append(k)
            yield GenerationRequest(f"row {k}", seed=k, steps=2 + k % 2)  # rows of 2 and 3 steps

    finished = []
    try:
        for index, image, placement in shapes.generate_stream(requests(), fixed_batch=2, **settings):
            finished.append((index, len(read)))
            assert image.size == (64, 64) and placement.rows == 2
    finally:
        shapes.prepare_ahead = None
    # Row 0 (2 steps) finishes first, having read only rows 0-1; row 2 takes its slot, etc.
    assert finished[0] == (0, 2)
    assert sorted(index for index, _ in finished) == [0, 1, 2, 3, 4]


def test_one_row_forwards_equal_the_batch_invariant_mode(shapes):
    settings = dict(sampler="ddpm", steps=5, guidance_scale=5.0, width=64, height=64)
    batch = rows(64)
    invariant = shapes.generate(batch, batch_invariant=True, **settings)
    fixed_one = shapes.generate(batch, fixed_batch=1, **settings)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(invariant, fixed_one))


def test_bad_shaping_is_refused(shapes):
    settings = dict(sampler="ddim", steps=2, guidance_scale=5.0, width=64, height=64)
    with pytest.raises(ValueError, match="fixed_batch"):
        shapes.generate(rows(64)[:1], fixed_batch=0, **settings)
    with pytest.raises(ValueError, match="slot 3 outside 0..2"):
        shapes.generate(rows(64)[:1], fixed_batch=3, slots=[3], **settings)
    with pytest.raises(ValueError, match="slots need fixed_batch"):
        shapes.generate(rows(64)[:1], slots=[0], **settings)
    with pytest.raises(ValueError, match="decode_batch: expected an integer >= 1, got 0"):
        shapes.generate(rows(64)[:1], fixed_batch=2, decode_batch=0, **settings)
    with pytest.raises(ValueError, match="decode slot 2 outside 0..1"):
        shapes.generate(rows(64)[:1], fixed_batch=2, decode_batch=2, decode_slots=[2], **settings)
    # Requests from an iterator: more or fewer than the slots given is named, not an IndexError.
    for extra in (dict(fixed_batch=2, slots=[1]), dict(fixed_batch=2, decode_batch=2, decode_slots=[1])):
        with pytest.raises(ValueError, match="have 1 entries, but request 1 came"):
            list(shapes.generate_stream(iter(rows(64)[:2]), **extra, **settings))
    with pytest.raises(ValueError, match="have 2 entries for 1 requests"):
        list(shapes.generate_stream(iter(rows(64)[:1]), fixed_batch=2, slots=[0, 1], **settings))


def test_sd15_size_reproduces_in_its_slot():
    """The full SD 1.5 architecture (random weights) at 64x64 pixels: kernels at SD size pick
    other algorithms than the small models', and each slot still reproduces bit for bit."""
    torch.set_num_threads(2)
    config = ModelConfig.sd15()
    pipe = assemble(config, random_parts(config, seed=0), source="random sd15")
    settings = dict(sampler="euler_a", steps=1, guidance_scale=7.5, width=64, height=64)
    batch = [GenerationRequest(f"row {k}", seed=k) for k in range(3)]
    placed = pipe.generate_placed(batch, fixed_batch=4, **settings)  # 3 rows + 1 filler
    # The first slot and the last row's, beside the filler (each remake is a forward of 8 rows).
    for request, (image, placement) in [(batch[0], placed[0]), (batch[2], placed[2])]:
        again = pipe.generate([request], fixed_batch=4, slots=[placement.slot], **settings)[0]
        assert np.array_equal(pixels(image), pixels(again)), placement
    del pipe
