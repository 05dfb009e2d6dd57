"""Batched txt2img / img2img with one random generator per row.

The randomness contract (SPEC.md): row r gets `torch.Generator("cpu").manual_seed(seed_r)` and
draws, in order and shape, what diffusers' StableDiffusion(Img2Img)Pipeline draws for one image:
txt2img: initial noise (1, 4, h, w); img2img: VAE posterior noise, then add-noise; then the
sampler's per-step noise (DDPM, Euler ancestral). Every per-row computation whose result could
depend on its batch neighbours runs one row at a time: text encoding, VAE encode, the VAE decode
unless `decode_batch` > 1 (then at one fixed shape, as below), and — unless
`batch_invariant=False` — the UNet. Convolution and matmul kernels (oneDNN, cuDNN, cuBLAS)
choose their algorithm by input shape, batch included, so the same row computed inside a batch
of 8 and alone can differ in the last float bits and, after rounding, by one pixel level. At one
fixed shape they do not depend on the *other* rows (measured: any neighbours leave a row's bits
unchanged), only on the row's position. Three ways to shape the UNet forwards follow:
`fixed_batch=N`: every forward runs N rows, padded with filler rows; a request's bits depend on
its inputs and its slot (its `Placement`), and rebuilding that forward with fillers remakes it
exactly: exact at batched throughput, what the job runner uses. `batch_invariant=True` (the
default): one row (its unconditional and conditional halves) per forward, the same as
`fixed_batch=1`: bit-identical whatever the batching. `batch_invariant=False`: all rows of a group
in one forward, whatever their number: images equal only within float tolerance across batch
sizes.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from . import rules
from .clip import CLIPTextModel
from .config import ModelConfig
from .devices import HostCopy, to_device
from .kernels import DEFAULT_CONV_ALGORITHM, set_conv_algorithm
from .layers import tensor_key
from .request import GenerationRequest, init_image_rgb
from .samplers import Sampler, Trajectory
from .tokenizer import tokenize
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

# Text embeddings are cached by prompt (the empty negative and repeated prompts are common), and
# emptied when the text encoder's weights change (checked once per generation, see
# `Pipeline.encode_prompt`). The cache is bounded in bytes, not entries: one SD 1.5 embedding
# (1, 77, 768) float32 is 236 KB, so 4096 entries would hold ~1 GB of device memory.
EMBEDDING_CACHE_BYTES = 64 * 2**20

# A decode's images are given out this many UNet forwards after it is queued on a CUDA device
# (see `_Decoder`): while the host reads them and hands them on, the GPU runs those forwards.
GIVE_OUT_LAG = 2

# On a CUDA device, a lane reads one batch of requests ahead of its free slots and starts them a
# few per forward (`_Lane.start_ahead`): their prompts encoded, their starting latents made.
# Starting a batch's rows only when its slots free up put ~11 ms of host time per prompt (the text
# encoder's kernel launches) between two forwards, with the GPU idle (bench/GPU_RESULTS.md, run 10).
PREPARE_AHEAD = True


@dataclass(frozen=True)
class Placement:
    """Where a request sat in its UNet forwards and its VAE decode, which decides its image's
    last bits: `rows` rows per forward (each a guidance pair when guided), the request in `slot`;
    `decode_rows` latents per decode, the request's in `decode_slot`. Rebuilding both with the
    request in its slots (any filler around it) gives the same image. `rows == 0` means the
    forwards were not fixed-shape (see `generate`)."""

    rows: int
    slot: int
    decode_rows: int = 1
    decode_slot: int = 0


_UNPLACED = Placement(rows=0, slot=0)


_FILLER_T = torch.tensor(0.0)  # the timestep of a filler slot (any value would do)


@dataclass
class _Flight:
    """A request in its slot: its latents, its generator, where it is on its sampler's schedule."""

    index: int
    request: GenerationRequest
    generator: torch.Generator
    trajectory: Trajectory
    x: torch.Tensor  # (1, 4, h, w)


class _Decoder:
    """The VAE decodes of a stream: finished latents wait, per latent size, until `rows` of them
    fill one decode, which then runs at that fixed shape (the stream's end pads a short one with
    zero latents). As with the UNet, a latent's pixels then depend on its slot in the decode,
    not on its neighbours. `rows` 1: each latent decoded alone as it finishes.

    A decode is queued on the device and its images are given out `lag` UNet forwards later
    (`forwarded`), or at the stream's end (`flush`). Reading the pixels on the host waits for the
    decode; given out at once (lag 0), that wait would drain the device's queue, and everything
    the host does next — handing the images on, admitting the next rows, encoding their prompts —
    would run with the device idle. `lag` forwards later, the device is busy with those forwards
    while the host reads the pixels and works. Lag 0 on a CPU, where nothing runs ahead."""

    def __init__(self, rows: int, decode: Callable[[torch.Tensor], HostCopy], lag: int = 0):
        self.rows = rows
        self.lag = lag
        self._decode = decode
        self._waiting: dict[tuple, list[tuple[int, torch.Tensor, Placement] | None]] = {}
        self._queued: deque[list] = deque()  # [forwards queued since, the decode's slots, its pixels]

    def add(self, index: int, latent: torch.Tensor, placement: Placement, slot: int | None = None) -> None:
        """Wait with a finished latent (1, 4, h, w), in `slot` if given; a full decode is queued."""
        key = tuple(latent.shape)
        slots = self._waiting.get(key)
        if slots is not None and slot is not None and slots[slot] is not None:
            self._run(key)  # that slot is taken: decode what waits first
            slots = None
        if slots is None:
            slots = self._waiting[key] = [None] * self.rows
        if slot is None:
            slot = slots.index(None)
        slots[slot] = (index, latent, placement)
        if all(entry is not None for entry in slots):
            self._run(key)

    def forwarded(self) -> None:
        """A UNet forward was queued: the queued decodes are one forward older."""
        for queued in self._queued:
            queued[0] += 1

    def ready(self) -> Iterator[tuple[int, Image.Image, Placement]]:
        """Give out the decodes that are at least `lag` forwards old, oldest first."""
        while self._queued and self._queued[0][0] >= self.lag:
            yield from self._give_out(self._queued.popleft())

    def flush(self) -> Iterator[tuple[int, Image.Image, Placement]]:
        """Decode every latent still waiting (short decodes padded); give every decode out."""
        for key in list(self._waiting):
            self._run(key)
        while self._queued:
            yield from self._give_out(self._queued.popleft())

    def _run(self, key: tuple) -> None:
        slots = self._waiting.pop(key)
        filler = torch.zeros_like(next(entry[1] for entry in slots if entry is not None))
        pixels = self._decode(torch.cat([filler if entry is None else entry[1] for entry in slots]))
        self._queued.append([0, slots, pixels])

    def _give_out(self, queued: list) -> Iterator[tuple[int, Image.Image, Placement]]:
        _, slots, pixels = queued
        arrays = pixels.result().numpy()
        for decode_slot, entry in enumerate(slots):
            if entry is not None:
                index, _, placement = entry
                # A copy: the image must not hold the page-locked buffer the pixels came into.
                image = Image.fromarray(arrays[decode_slot].copy())
                yield index, image, replace(placement, decode_rows=self.rows, decode_slot=decode_slot)


class _Lane:
    """The forwards of one shape: `rows` slots (each empty or holding a request in flight) and the
    requests waiting for one, each with the slot it asks for (None: any)."""

    def __init__(self, rows: int, guided: bool):
        self.rows = rows
        self.guided = guided
        self.slots: list[_Flight | None] = [None] * rows
        self.queue: deque[tuple[int, GenerationRequest, int | None]] = deque()
        self.started: dict[int, _Flight] = {}  # queued requests started ahead, by request index
        self._context: tuple[list[_Flight | None], torch.Tensor] | None = None  # (slots it was built for, it)

    @staticmethod
    def key_of(request: GenerationRequest) -> tuple:
        """What fixes a forward's shape: the latent size, and whether rows run a guidance pair."""
        return (request.width, request.height, rules.guided(request.guidance_scale))

    @property
    def busy(self) -> bool:
        return any(flight is not None for flight in self.slots)

    def wants_more(self, ahead: int = 0) -> bool:
        """Fewer requests wait than slots are free (plus `ahead`)."""
        return len(self.queue) < sum(flight is None for flight in self.slots) + ahead

    def context(self, encode_prompt: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The forward's text context: each slot's prompt embedding ((negative, then prompt) x
        rows when guided; the empty prompt in a free slot). The same tensor object while the
        slots hold the same rows, so the UNet's cross-attentions keep its K and V between steps
        (sdcore/layers.py). An ordinary tensor, not an inference one even in inference mode: the
        attentions keep K and V only for a context whose version counter tells them it was not
        changed in place since, and inference tensors have none."""
        flights = self.slots
        if self._context is not None and all(a is b for a, b in zip(self._context[0], flights)):
            return self._context[1]
        cond = [encode_prompt("" if f is None else f.request.prompt) for f in flights]
        if self.guided:
            cond = [encode_prompt("" if f is None else f.request.negative) for f in flights] + cond
        with torch.inference_mode(False), torch.no_grad():
            context = torch.cat(cond)  # (rows or 2 rows, 77, D): the same bits in either mode
        # The slots it was built for are kept, so their ids cannot be reused by new flights.
        self._context = (list(flights), context)
        return self._context[1]

    def admit(self) -> list[tuple[int, int, GenerationRequest]]:
        """Fill free slots from the queue in order: (slot, index, request) for each admitted; a
        request asking for a slot waits until that slot is free."""
        admitted = []
        for slot, flight in enumerate(self.slots):
            if flight is not None:
                continue
            pick = next((item for item in self.queue if item[2] is None or item[2] == slot), None)
            if pick is not None:
                self.queue.remove(pick)
                admitted.append((slot, pick[0], pick[1]))
        return admitted

    def start_ahead(self, start: Callable[[int, GenerationRequest], _Flight]) -> None:
        """Start queued requests before a slot takes them (`start`: the pipeline's `_start`, which
        also encodes the prompts), as many per forward as makes them all ready by the time the
        first slot frees up. Nothing here depends on when it runs: each row has its own generator
        and its own batch-of-one text and VAE encodes, so its bits are the same either way."""
        waiting = [(index, request) for index, request, _ in self.queue if index not in self.started]
        forwards_left = min((f.trajectory.remaining for f in self.slots if f is not None), default=0)
        if not waiting or not forwards_left:  # nothing to do, or the slots take them next
            return
        for index, request in waiting[: -(-len(waiting) // forwards_left)]:  # ceil division
            self.started[index] = start(index, request)


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], resized (Lanczos) to width x height.
    RGB as `sdcore.request.init_image_rgb` makes it (16-bit grey scaled to 8 bits; ValueError
    for an image without pixels or of a mode whose range is ambiguous)."""
    image = init_image_rgb(image)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    # (H, W, 3) -> (1, 3, H, W)
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding as diffusers' image processor does
    (its numpy steps, in the same float32 arithmetic, on the tensor's device: a quarter of the
    bytes to copy to the host, and no host time; elementwise, so a row's pixels do not depend on
    the others)."""
    x = (x / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


def _request_list(requests: Any) -> Any:
    """`requests` itself, refusing one request (or a prompt) passed where a list of them goes."""
    if isinstance(requests, (GenerationRequest, Mapping, str)):
        raise TypeError(
            f"requests: expected a list of GenerationRequest (or mappings), got one {type(requests).__name__}; "
            "pass [request]"
        )
    return requests


def _one_slot_each(
    resolved: Iterator[tuple[int, GenerationRequest]], count: int
) -> Iterator[tuple[int, GenerationRequest]]:
    """The requests, refusing (ValueError) more or fewer of them than the `count` entries of the
    slots / decode_slots given: one entry per request."""
    read = 0
    for index, request in resolved:
        if index >= count:
            raise ValueError(f"slots/decode_slots have {count} entries, but request {index} came: one per request")
        read += 1
        yield index, request
    if read != count:
        raise ValueError(f"slots/decode_slots have {count} entries for {read} requests: one per request")


def _count_of(name: str, value: Any) -> int:
    """A count given to `generate` (`fixed_batch`, `decode_batch`) as a Python int: any integer
    `sdcore.rules` takes (a numpy integer, a 0-dim torch integer tensor), >= 1."""
    if not rules.is_integer(value) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _slot_list(name: str, what: str, asked: Sequence[Any], rows: int) -> list[int | None]:
    """`slots` / `decode_slots` as Python ints (or None: any slot), each in 0..rows-1."""
    slots: list[int | None] = []
    for index, slot in enumerate(asked):
        if slot is not None and not rules.is_integer(slot):
            raise ValueError(f"{name}: request {index}'s entry: expected an integer slot or None, got {slot!r}")
        if slot is not None and not 0 <= int(slot) < rows:
            raise ValueError(f"{what} {int(slot)} outside 0..{rows - 1} (request {index})")
        slots.append(None if slot is None else int(slot))
    return slots


class Pipeline:
    """The three networks of one SD 1.x checkpoint on one device, ready to generate."""

    def __init__(
        self,
        config: ModelConfig,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        *,
        fingerprint: str,
        source: str,
        stored_dtypes: dict[str, dict[str, torch.dtype]] | None = None,
    ):
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.fingerprint = fingerprint  # of the tensors as stored (sdcore.weights.fingerprint)
        self.source = source
        # part -> key -> the dtype each floating tensor was stored in (None: unknown): an export
        # writes them so again, so that the exported file has the source's fingerprint.
        self.stored_dtypes = stored_dtypes
        self.compile_mode = "none"  # see sdcore.kernels.compile_unet
        set_conv_algorithm(self, DEFAULT_CONV_ALGORITHM)  # sets self.conv_algorithm
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._embedding_bytes = 0
        self._embeddings_made_by: tuple | None = None  # the text encoder's weights' key (see _text_encoder_key)
        self._give_out_lag: int | None = None  # None: GIVE_OUT_LAG on CUDA, 0 elsewhere
        self._prepare_ahead: bool | None = None  # None: PREPARE_AHEAD on CUDA, off elsewhere

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The one floating dtype the weights were stored in; None when mixed or unknown."""
        dtypes = {d for part in (self.stored_dtypes or {}).values() for d in part.values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def give_out_lag(self) -> int:
        """UNet forwards queued after a VAE decode before its images are given out (`_Decoder`):
        2 on CUDA, so reading them never leaves the GPU idle; 0 on a CPU. Settable (an A/B)."""
        if self._give_out_lag is not None:
            return self._give_out_lag
        return GIVE_OUT_LAG if self.device.type == "cuda" else 0

    @give_out_lag.setter
    def give_out_lag(self, forwards: int | None) -> None:
        self._give_out_lag = forwards

    @property
    def prepare_ahead(self) -> bool:
        """Whether a lane reads a batch of requests ahead and starts them while forwards run
        (`_Lane.start_ahead`): on CUDA, where the host's work then overlaps the GPU's; off on
        a CPU, where it would only take rows from the caller earlier. Settable (an A/B); the
        images are the same either way."""
        if self._prepare_ahead is not None:
            return self._prepare_ahead
        return PREPARE_AHEAD and self.device.type == "cuda"

    @prepare_ahead.setter
    def prepare_ahead(self, ahead: bool | None) -> None:
        self._prepare_ahead = ahead

    @property
    def size_multiple(self) -> int:
        """Width/height must be multiples of this (the VAE's factor, 8 for SD 1.x)."""
        return self.config.vae.scale_factor

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "unet": self.unet.state_dict(),
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
        }

    def clear_embedding_cache(self) -> None:
        self._embeddings.clear()
        self._embedding_bytes = 0
        self._embeddings_made_by = None

    def _text_encoder_key(self) -> tuple:
        """What identifies the text encoder's current weights (each tensor's storage, in-place
        version, dtype and device, as the UNet's caches check theirs: `sdcore.layers.tensor_key`),
        so that `load_state_dict`, `.to(...)` or an in-place change of any of them is seen. A few
        hundred attribute reads: asked once per generation, not per prompt."""
        encoder = self.text_encoder
        return (id(encoder), *(tensor_key(t) for t in itertools.chain(encoder.parameters(), encoder.buffers())))

    def _check_embedding_cache(self) -> None:
        """Empty the prompt cache if the text encoder's weights changed since it was filled."""
        key = self._text_encoder_key()
        if key != self._embeddings_made_by:
            self.clear_embedding_cache()
            self._embeddings_made_by = key

    @property
    def embedding_cache_bytes(self) -> int:
        """Bytes of text embeddings held in the prompt cache (at most EMBEDDING_CACHE_BYTES, or
        one embedding when a single one is larger)."""
        return self._embedding_bytes

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt -> (1, 77, D) text embedding, cached (the empty negative repeats a lot); the
        cache is emptied when the text encoder's weights have changed since it was filled."""
        self._check_embedding_cache()
        return self._encode_prompt(prompt)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """`encode_prompt` without the weights check: within a generation, which checks them
        once at its start (under inference mode, as every caller here is)."""
        cached = self._embeddings.get(prompt)
        if cached is not None:
            self._embeddings.move_to_end(prompt)
            return cached
        ids = to_device(tokenize([prompt]), self.device)
        embedding = self.text_encoder(ids)
        self._embeddings[prompt] = embedding
        self._embedding_bytes += embedding.numel() * embedding.element_size()
        while self._embedding_bytes > EMBEDDING_CACHE_BYTES and len(self._embeddings) > 1:
            _, evicted = self._embeddings.popitem(last=False)
            self._embedding_bytes -= evicted.numel() * evicted.element_size()
        return embedding

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest | Mapping[str, Any]],
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        karras: bool = False,
        batch_invariant: bool = True,
        fixed_batch: int | None = None,
        slots: Sequence[int | None] | None = None,
        decode_batch: int = 1,
        decode_slots: Sequence[int | None] | None = None,
    ) -> list[Image.Image]:
        """Images for `requests`, in order.

        The keyword settings (`sampler`, `steps`, `guidance_scale`, `width`, `height`, `karras`)
        apply to every request that does not set its own (see `GenerationRequest`); one may be
        left out when every request sets it (a request with a value from neither is a ValueError
        naming the setting). Mappings are read with `GenerationRequest.from_mapping`. ValueError,
        naming the request's index, for anything `sdcore.rules` refuses. How the UNet forwards
        are shaped (which decides an image's last bits, see the module docstring); rows share a
        forward only with `fixed_batch` or `batch_invariant=False`, and then whatever their
        sampler, steps, strength or guidance scale (only the size, and guided or not, split them):

        - `fixed_batch=N`: every forward runs N rows (a short batch is padded with filler rows),
          and a row's image depends only on its own inputs and its slot among the N; `slots`
          may ask for a slot per request (reproduce uses it to rebuild a recorded forward).
          `generate_placed` also returns each request's `Placement`.
        - else `batch_invariant=True` (default): one row per forward: images are the same
          whatever the batching.
        - else: all rows of a group in one forward, whatever their number.

        The VAE decodes each finished latent alone by default (`decode_batch=1`: on a CPU that is
        as fast per image as batching). `decode_batch=M` decodes M finished latents per VAE
        forward, at that one shape (the last one padded with zero latents): what a GPU needs,
        where one 512x512 decode leaves most of the chip idle. Each image then depends on its
        slot in its decode too (`Placement.decode_slot`); `decode_slots` asks for one per
        request, the way `slots` does for the UNet.
        """
        placed = self.generate_placed(
            requests,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            karras=karras,
            batch_invariant=batch_invariant,
            fixed_batch=fixed_batch,
            slots=slots,
            decode_batch=decode_batch,
            decode_slots=decode_slots,
        )
        return [image for image, _ in placed]

    @torch.inference_mode()
    def generate_placed(
        self,
        requests: Sequence[GenerationRequest | Mapping[str, Any]],
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        karras: bool = False,
        batch_invariant: bool = True,
        fixed_batch: int | None = None,
        slots: Sequence[int | None] | None = None,
        decode_batch: int = 1,
        decode_slots: Sequence[int | None] | None = None,
    ) -> list[tuple[Image.Image, Placement]]:
        """`generate`, with where each request sat in its UNet forwards. Every request is checked
        before any is generated."""
        defaults = dict(
            sampler=sampler, karras=karras, steps=steps, guidance_scale=guidance_scale, width=width, height=height
        )
        resolved = [self._resolve(i, request, defaults) for i, request in enumerate(_request_list(requests))]
        placed: list[tuple[Image.Image, Placement] | None] = [None] * len(resolved)
        stream = self._stream(
            enumerate(resolved), batch_invariant, fixed_batch, slots, len(resolved), decode_batch, decode_slots
        )
        for index, image, placement in stream:
            placed[index] = (image, placement)
        return placed

    def generate_stream(
        self,
        requests: Iterable[GenerationRequest | Mapping[str, Any]],
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        karras: bool = False,
        batch_invariant: bool = True,
        fixed_batch: int | None = None,
        slots: Sequence[int | None] | None = None,
        decode_batch: int = 1,
        decode_slots: Sequence[int | None] | None = None,
    ) -> Iterator[tuple[int, Image.Image, Placement]]:
        """`generate_placed` as a stream: (request index, image, placement) per request as soon
        as its image is made, in completion order.

        A request is read from `requests` only when a slot can take it (with `prepare_ahead`, on
        CUDA: up to one batch earlier), so an iterator of requests (e.g. one that reads init
        images on demand) keeps memory flat however long it is; a request is checked when it is
        read. `batch_invariant=False` without `fixed_batch` reads every request first (its
        forwards hold all rows of a size at once).
        """
        defaults = dict(
            sampler=sampler, karras=karras, steps=steps, guidance_scale=guidance_scale, width=width, height=height
        )
        resolved = ((i, self._resolve(i, request, defaults)) for i, request in enumerate(_request_list(requests)))
        count = next((len(asked) for asked in (slots, decode_slots) if asked is not None), None)
        if count is not None:  # the requests may be an iterator: their number is known only as they come
            resolved = _one_slot_each(resolved, count)
        with torch.inference_mode():
            yield from self._stream(resolved, batch_invariant, fixed_batch, slots, count, decode_batch, decode_slots)

    def _stream(
        self,
        resolved: Iterable[tuple[int, GenerationRequest]],
        batch_invariant: bool,
        fixed_batch: int | None,
        slots: Sequence[int | None] | None,
        count: int | None,
        decode_batch: int = 1,
        decode_slots: Sequence[int | None] | None = None,
    ) -> Iterator[tuple[int, Image.Image, Placement]]:
        """Continuous batching (see the module docstring): requests go into lanes, one per forward
        shape (width, height, guided or not); a lane runs until it drains, its free slots taking
        the next requests of its shape as they come."""
        if fixed_batch is not None:
            fixed_batch = _count_of("fixed_batch", fixed_batch)
        if slots is not None:
            if fixed_batch is None or len(slots) != count:
                raise ValueError("slots need fixed_batch and one entry per request")
            slots = _slot_list("slots", "slot", slots, fixed_batch)
        decode_batch = _count_of("decode_batch", decode_batch)
        if decode_slots is not None:
            if len(decode_slots) != count:
                raise ValueError("decode_slots need one entry per request")
            decode_slots = _slot_list("decode_slots", "decode slot", decode_slots, decode_batch)
        self._check_embedding_cache()  # once per generation: the text encoder may have changed since the last
        resolved = iter(resolved)
        if fixed_batch is not None:
            lane_rows = lambda key: fixed_batch  # noqa: E731
        elif batch_invariant:
            lane_rows = lambda key: 1  # noqa: E731
        else:  # one forward holds every row of a shape: read them all to count them
            resolved = list(resolved)
            sizes = Counter(_Lane.key_of(request) for _, request in resolved)
            lane_rows = sizes.__getitem__
            resolved = iter(resolved)
        try:
            decoder = _Decoder(decode_batch, self._decode, self.give_out_lag)
            yield from self._run_lanes(resolved, lane_rows, fixed_batch, slots, decoder, decode_slots)
        finally:
            self.unet.forget_context()  # the last batch's text K and V: not kept past the generation

    def _run_lanes(
        self,
        resolved: Iterator[tuple[int, GenerationRequest]],
        lane_rows: Callable[[tuple], int],
        fixed_batch: int | None,
        slots: Sequence[int | None] | None,
        decoder: _Decoder,
        decode_slots: Sequence[int | None] | None,
    ) -> Iterator[tuple[int, Image.Image, Placement]]:
        lanes: dict[tuple, _Lane] = {}
        exhausted = False
        ahead = self.prepare_ahead

        def read(lane: _Lane | None, extra: int = 0) -> _Lane | None:
            """Read requests into their lanes' queues until `lane` has `extra` more waiting than
            it has free slots (until any lane has a request, when None); the lane to run."""
            nonlocal exhausted
            while not exhausted and (lane is None or lane.wants_more(extra)):
                item = next(resolved, None)
                if item is None:
                    exhausted = True
                    break
                index, request = item
                key = _Lane.key_of(request)
                if key not in lanes:
                    lanes[key] = _Lane(lane_rows(key), guided=key[2])
                lanes[key].queue.append((index, request, None if slots is None else slots[index]))
                lane = lane or lanes[key]
            return lane

        while True:
            lane = next((lane for lane in lanes.values() if lane.busy), None)
            lane = read(lane or next((lane for lane in lanes.values() if lane.queue), None))
            if lane is None:
                yield from decoder.flush()
                return
            for slot, index, request in lane.admit():
                lane.slots[slot] = lane.started.pop(index, None) or self._start(index, request)
            finished = self._forward(lane)
            decoder.forwarded()
            # Before this forward's rows queue a decode: reading a decode's pixels then waits only
            # for work queued before this forward, which keeps the device busy meanwhile.
            yield from decoder.ready()
            for slot, flight in finished:
                placement = Placement(rows=lane.rows, slot=slot) if fixed_batch is not None else _UNPLACED
                decode_slot = None if decode_slots is None else decode_slots[flight.index]
                decoder.add(flight.index, flight.x, placement, decode_slot)
            if ahead and (lane.busy or lane.queue):  # while the device runs this forward: the next rows
                read(lane, extra=lane.rows)
                lane.start_ahead(self._start)
            yield from decoder.ready()  # with lag 0: what was just decoded

    def _resolve(self, index: int, request: GenerationRequest | Mapping[str, Any], defaults: dict) -> GenerationRequest:
        try:
            if not isinstance(request, GenerationRequest):
                if not isinstance(request, Mapping):
                    raise ValueError(f"expected a GenerationRequest or a mapping, got {type(request).__name__}")
                request = GenerationRequest.from_mapping(request)
            return request.resolve(defaults, self.size_multiple)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"request {index}: {exc}") from None

    def _start(self, index: int, request: GenerationRequest) -> _Flight:
        """A request ready for a slot: its generator, its starting latent, its trajectory; its
        prompts encoded (into the cache the forward's context reads)."""
        sampler = Sampler(request.sampler, request.steps, request.karras)
        start = 0 if request.strength is None else sampler.start_index(request.strength)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latent = self._initial_latent(request, sampler, generator)
        self._encode_prompt(request.prompt)
        if rules.guided(request.guidance_scale):
            self._encode_prompt(request.negative)
        return _Flight(index, request, generator, sampler.trajectory(start), latent)

    def _forward(self, lane: _Lane) -> list[tuple[int, _Flight]]:
        """One UNet forward over the lane's slots, then one sampler step for every row in flight;
        returns the (slot, row) pairs that finished (their slots are free again).

        Each row brings its own timestep, prompt and guidance scale. A free slot is filled with
        zero latents, timestep 0 and the empty prompt: at a fixed shape the kernels do not let a
        row's neighbours change its bits, so what fills a slot does not matter."""
        flights = lane.slots
        filler = torch.zeros_like(next(f.x for f in flights if f is not None))
        x = torch.cat([filler if f is None else f.trajectory.model_input(f.x) for f in flights])  # (rows, 4, h, w)
        t = to_device(torch.stack([_FILLER_T if f is None else f.trajectory.timestep() for f in flights]), self.device)
        context = lane.context(self._encode_prompt)
        if lane.guided:
            # Both halves in one forward, unconditional first as diffusers orders them:
            # (rows, ...) x 2 -> (2 rows, ...)
            eps_uncond, eps_cond = self.unet(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        else:  # diffusers skips the unconditional pass at guidance <= 1
            eps_cond = self.unet(x, t, context)
        finished = []
        for slot, flight in enumerate(flights):
            if flight is None:
                continue
            eps = eps_cond[slot : slot + 1]
            if lane.guided:  # classifier-free guidance (Ho & Salimans 2022)
                eps_u = eps_uncond[slot : slot + 1]
                eps = eps_u + flight.request.guidance_scale * (eps - eps_u)
            flight.x = flight.trajectory.step(flight.x, eps, [flight.generator])
            if flight.trajectory.done:
                finished.append((slot, flight))
                lane.slots[slot] = None
        return finished

    def _initial_latent(
        self, request: GenerationRequest, schedule: Sampler, generator: torch.Generator
    ) -> torch.Tensor:
        """The request's starting latent (1, 4, h, w), drawing from its generator in diffusers' order."""
        factor = self.size_multiple
        shape = (1, self.config.vae.latent_channels, request.height // factor, request.width // factor)
        if request.init_image is None:
            noise = torch.randn(shape, generator=generator, dtype=self.dtype)
            return schedule.txt2img_latents(to_device(noise, self.device))
        pixels = to_device(image_to_tensor(request.init_image, request.width, request.height), self.device, self.dtype)
        mean, logvar = self.vae.encode(pixels)
        # Sample the VAE posterior: mean + std * N(0, I), the first draw of an img2img row.
        eps = to_device(torch.randn(mean.shape, generator=generator, dtype=mean.dtype), self.device)
        init = (mean + torch.exp(0.5 * logvar) * eps) * self.config.vae.scaling_factor
        noise = to_device(torch.randn(shape, generator=generator, dtype=self.dtype), self.device)
        return schedule.img2img_latents(init, noise, schedule.start_index(request.strength))

    def _decode(self, latents: torch.Tensor) -> HostCopy:
        """Latents (B, 4, h, w) -> their pixels (B, H, W, 3) uint8, in one VAE forward, on their
        way to the host (`HostCopy.result()` waits for them)."""
        return HostCopy(pixels_to_uint8(self.vae.decode(latents / self.config.vae.scaling_factor)))
