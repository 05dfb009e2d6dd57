"""Derive `vocab.json` and `merges.txt` (transformers' CLIPTokenizer format) from OpenAI CLIP's BPE file.

How the shipped files were made (run once, from the repository root):

    pip install --no-deps open-clip-torch      # only for its data file; never imported
    python sdcore/vocab/build_vocab.py          # finds open_clip/bpe_simple_vocab_16e6.txt.gz
    # or: python sdcore/vocab/build_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz [OUT_DIR]

Source used: open_clip_torch 3.3.0, `bpe_simple_vocab_16e6.txt.gz`,
sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a (the same file OpenAI's
`clip` package ships). The result is the 49408-token vocabulary of CLIP ViT-L/14, the text
encoder of Stable Diffusion 1.x.

Construction (as OpenAI's `SimpleTokenizer.__init__` does it):
  1. merges = lines 1 .. 49152-256-2 of the file (line 0 is a "#version" header): 48894 pairs;
  2. vocab ids, in order: the 256 byte symbols of `bytes_to_unicode()` (0..255), the same 256
     with "</w>" appended (256..511), every merge joined (512..49405), then `<|startoftext|>`
     (49406) and `<|endoftext|>` (49407).
Standard library only, so it runs without torch.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # 48894: CLIP's vocab budget minus bytes and the two specials
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"  # what transformers' merges.txt files start with (skipped on load)


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 (GPT-2/CLIP byte-level BPE), in byte order.

    Bytes that are already visible Latin-1 characters stand for themselves; the others (control
    characters, space, soft hyphen...) take code points 256, 257, ... in byte order.
    """
    visible = (
        set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = {}, 0
    for b in range(256):
        if b in visible:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the base vocabulary visible bytes first, then the remapped ones.
    return [symbols[b] for b in sorted(visible)] + [symbols[b] for b in range(256) if b not in visible]


def derive(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Returns (token -> id, merge lines "a b") for CLIP's text tokenizer."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    assert len(merges) == NUM_MERGES and all(len(m.split()) == 2 for m in merges)
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base] + [m.replace(" ", "") for m in merges] + list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, "duplicate tokens"
    return vocab, merges


def write(vocab: dict[str, int], merges: list[str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False keeps the file readable and ~2x smaller; sorted by id like HF's files.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")


def default_source() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip not installed: pass the path to bpe_simple_vocab_16e6.txt.gz")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def main(argv: list[str]) -> None:
    src = Path(argv[0]) if argv else default_source()
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    vocab, merges = derive(src)
    write(vocab, merges, out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges from {src} to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
