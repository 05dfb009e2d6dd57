"""jobs/init_images.py: init images are read once, named in every error, and kept in an LRU cache."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from jobs.init_images import InitImageCache, InitImageError, decode_init_image, read_init_image

from conftest import init_image


def test_an_init_image_is_rgb_with_the_sha256_of_its_file(tmp_path):
    path = init_image(tmp_path / "a.png")
    loaded = read_init_image(str(path))
    assert loaded.image.mode == "RGB" and loaded.image.size == (32, 32)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_problems_name_the_image(tmp_path):
    with pytest.raises(InitImageError, match=r"init_image not found: .*none\.png"):
        read_init_image(str(tmp_path / "none.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InitImageError, match=r"init_image .*bad\.png: not a readable image \(UnidentifiedImageError"):
        read_init_image(str(tmp_path / "bad.png"))


def test_the_cache_keeps_the_most_recently_used(tmp_path):
    paths = [str(init_image(tmp_path / f"{i}.png", color=(i, 0, 0))) for i in range(3)]
    cache = InitImageCache(capacity=2)
    first = cache.load(paths[0])
    cache.load(paths[1])
    assert cache.load(paths[0]) is first  # a hit, and now the most recent
    cache.load(paths[2])  # evicts paths[1]
    assert len(cache) == 2 and cache.load(paths[0]) is first
    (tmp_path / "1.png").unlink()
    with pytest.raises(InitImageError, match="not found"):
        cache.load(paths[1])


def test_only_regular_files_under_the_caps_are_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.png")  # opened without blocking, then refused
    for uri in (str(tmp_path / "fifo.png"), "/dev/zero", str(tmp_path)):
        with pytest.raises(InitImageError, match="not a regular file|a directory|cannot read"):
            read_init_image(uri)
    big = init_image(tmp_path / "big.png", size=64)
    with pytest.raises(InitImageError, match="64x64 pixels, over the cap of 1000"):
        read_init_image(str(big), max_pixels=1000)
    with pytest.raises(InitImageError, match="over the cap of 100"):
        read_init_image(str(big), max_bytes=100)
    with pytest.raises(InitImageError, match="cannot read"):
        read_init_image(str(tmp_path / "a\x00.png"))


def test_the_cache_is_bounded_in_bytes(tmp_path):
    paths = [str(init_image(tmp_path / f"{i}.png", size=32)) for i in range(4)]
    cache = InitImageCache(capacity=64, max_bytes=2 * 32 * 32 * 3)  # two decoded images
    for path in paths:
        cache.load(path)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    huge = InitImageCache(max_bytes=100)  # an image larger than the whole budget is not kept
    huge.load(paths[0])
    assert len(huge) == 0


def _exif_rotated_jpeg() -> bytes:
    """A 64x32 JPEG, left half red, whose EXIF says: show it turned 90 degrees clockwise."""
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_an_exif_rotated_photo_is_used_upright_as_diffusers_load_image_does():
    from diffusers.utils import load_image

    data = _exif_rotated_jpeg()
    upright = decode_init_image(data)
    reference = load_image(Image.open(io.BytesIO(data)))  # diffusers applies the EXIF orientation
    assert upright.size == (32, 64) == reference.size
    assert np.array_equal(np.asarray(upright), np.asarray(reference))
    assert decode_init_image(data, decoding=1).size == (64, 32)  # as records before INIT_DECODING 2 had it


def test_a_16_bit_greyscale_png_keeps_its_greys():
    """PIL's convert("RGB") clips mode I;16 to 255: the whole image came out white."""
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    source.save(buffer, format="PNG")
    image = decode_init_image(buffer.getvalue())
    assert np.asarray(image)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert set(np.asarray(decode_init_image(buffer.getvalue(), decoding=1)).ravel().tolist()) <= {0, 255}


@pytest.mark.parametrize("mode", ["I", "F"])
def test_a_job_refuses_32_bit_integer_and_float_images_as_the_library_does_and_old_records_still_decode(tmp_path, mode):
    """Modes I and F have no fixed range of values (0..1? 0..255? 0..65535?): convert("RGB")
    clipped a 16-bit-valued TIFF to white. A job's row now gets an error naming the mode, as
    sdcore's `init_image_rgb` raises; reproduce of a record made before that still decodes it
    the old way (clipped), so that record keeps reproducing."""
    from sdcore.request import init_image_rgb

    values = np.array([[0, 300], [40000, 70000]], dtype=np.int32 if mode == "I" else np.float32)
    image = Image.fromarray(values)
    assert image.mode == mode
    path = tmp_path / f"{mode}.tiff"
    image.save(path, format="TIFF")
    with pytest.raises(InitImageError, match=rf"init_image .*{mode}\.tiff: mode {mode} \(32-bit"):
        read_init_image(str(path))
    with pytest.raises(ValueError, match=rf"mode {mode} \(32-bit"):
        init_image_rgb(Image.open(path))
    old = decode_init_image(path.read_bytes())  # how reproduce decodes an earlier record of it
    assert np.asarray(old)[..., 0].tolist() == [[0, 255], [255, 255]]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decoding_2_before_sdcore_shared_it(data: bytes) -> Image.Image:
    """INIT_DECODING 2 as jobs/init_images.py wrote it inline before it called sdcore's
    `grey_to_8_bits`: the bits records with `init_decoding` 2 were made with."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    return image.convert("RGB")


def test_decoding_2_is_byte_identical_through_sdcores_shared_function_and_the_library_reads_the_same():
    """Records carry `init_decoding` 2 and reproduce relies on its bits: the shared function
    gives exactly the bytes of the inline code it replaced, for 16-bit grey (both byte orders),
    8-bit grey, RGB, RGBA, palette and EXIF-rotated files; the library's `init_image_rgb`, given
    the file's image, gives the same RGB pixels (EXIF aside, which is the job's to apply)."""
    from sdcore.request import init_image_rgb

    ramp = np.linspace(0, 65535, 24 * 16).reshape(16, 24).astype(np.uint16)
    colour = np.random.default_rng(0).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    files = {
        "I;16": _png(Image.fromarray(ramp)),
        "I;16B": _png(Image.frombytes("I;16B", (24, 16), ramp.astype(">u2").tobytes())),
        "L": _png(Image.fromarray(colour[..., 0])),
        "RGB": _png(Image.fromarray(colour[..., :3])),
        "RGBA": _png(Image.fromarray(colour)),
        "P": _png(Image.fromarray(colour[..., :3]).convert("P")),
        "exif": _exif_rotated_jpeg(),
    }
    for name, data in files.items():
        decoded = decode_init_image(data)
        assert decoded.mode == "RGB"
        assert decoded.tobytes() == _decoding_2_before_sdcore_shared_it(data).tobytes(), name
        if name != "exif":
            assert init_image_rgb(Image.open(io.BytesIO(data))).tobytes() == decoded.tobytes(), name
    assert len(set(np.asarray(decode_init_image(files["I;16"])).ravel().tolist())) > 200  # greys, not white
