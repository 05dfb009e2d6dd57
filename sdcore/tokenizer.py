"""SD 1.x prompt tokenizer: CLIP ViT-L/14's byte-level BPE through transformers' `CLIPTokenizer`.

Why the vocabulary is shipped in `sdcore/vocab/`: every SD 1.x checkpoint uses the one fixed
49408-token CLIP vocabulary, but a single-file `.safetensors`/`.ckpt` does not contain it, and
fetching `openai/clip-vit-large-patch14` from the Hugging Face hub at run time would make jobs
depend on the network. So `vocab.json`/`merges.txt` (1.5 MB) were derived once from OpenAI's
`bpe_simple_vocab_16e6.txt.gz` by `sdcore/vocab/build_vocab.py` and are committed.

Text cleaning: `tokenize` first applies CLIP's own cleaning (`clean_prompt`: ftfy, HTML
unescape, whitespace, lowercase), the text pipeline the CLIP text encoder was trained with (OpenAI
`clip.simple_tokenizer`), so ids equal OpenAI/open_clip `SimpleTokenizer`'s. transformers >= 5's
`CLIPTokenizer` on its own skips ftfy and HTML unescaping (transformers 4's slow tokenizer ran
ftfy but not the unescaping); for any prompt that `clean_prompt` leaves unchanged (the usual
case) ids equal diffusers' `StableDiffusionPipeline`'s, and for every prompt they equal what
that pipeline produces when given `clean_prompt(prompt)`.
"""

from __future__ import annotations

import functools
import html
import os
import re
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
MAX_LENGTH = 77  # CLIP's context: BOS + 75 prompt tokens + EOS
BOS_ID, EOS_ID = 49406, 49407  # <|startoftext|>, <|endoftext|>; SD 1.x also pads with EOS_ID

# The fast tokenizer's Rust backend is re-configured (padding/truncation) on every call and
# raises "Already borrowed" if two threads do that at once; calls are cheap, so serialize them.
_lock = threading.Lock()


class PromptTruncatedWarning(UserWarning):
    """A prompt had more than 75 tokens; the tail was dropped (CLIP sees 77 ids at most)."""


# Frames a warning does not point at: sdcore's own, and torch's (the `inference_mode` decorators
# around `Pipeline.generate` and `encode_prompt`).
_LIBRARY_DIRS = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__))


def _caller_stacklevel() -> int:
    """The `stacklevel` that makes a warning raised by this function's caller point at the
    first frame outside sdcore and torch: the user's line that called `generate` (or iterated
    `generate_stream`, or called `tokenize`), however deep in the pipeline the warning starts.
    (Python 3.12's `skip_file_prefixes` does this; sdcore runs on 3.10 too.)"""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> CLIPTokenizer:
    """The SD 1.x tokenizer built from the shipped vocabulary (cached; no network).

    Save it into diffusers folders with `save_pretrained`; it reloads with
    `CLIPTokenizer.from_pretrained` to the same ids.
    """
    tok = CLIPTokenizer.from_pretrained(
        str(VOCAB_DIR),
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49408, BOS_ID, EOS_ID, EOS_ID)
    return tok


def clean_prompt(text: str) -> str:
    """CLIP's text cleaning: fix mojibake/width/quotes (ftfy), unescape HTML twice, collapse
    whitespace, lowercase.

    The tokenizer lowercases again, but char by char: Python's `str.lower` (what CLIP used) also
    applies context rules such as Greek final sigma ("ΑΣ" -> "ας", not "ασ").
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def tokenize(prompts: Sequence[str]) -> torch.LongTensor:
    """Token ids (B, 77) for a batch of prompts: BOS, up to 75 tokens, EOS, then EOS as padding.

    Longer prompts are truncated as diffusers does (75 tokens kept, EOS last) with a
    `PromptTruncatedWarning` naming the prompt and the number of tokens dropped.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize() takes a sequence of prompts, not a single str")
    if len(prompts) == 0:
        return torch.empty(0, MAX_LENGTH, dtype=torch.long)
    tok = get_tokenizer()
    texts = [clean_prompt(p) for p in prompts]
    with _lock:
        # The same call as diffusers' StableDiffusionPipeline.encode_prompt.
        ids = tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        lengths = _lengths(tok, texts)
    for prompt, n in zip(prompts, lengths):
        if n > MAX_LENGTH:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            # warnings' default filter shows each distinct message (so each prompt) once.
            warnings.warn(
                f"prompt {short!r} has {n - 2} tokens, CLIP takes {MAX_LENGTH - 2}: "
                f"the last {n - MAX_LENGTH} tokens were dropped",
                PromptTruncatedWarning,
                stacklevel=_caller_stacklevel(),
            )
    return ids  # (B, 77) int64


def _lengths(tok: CLIPTokenizer, texts: list[str]) -> list[int]:
    """Untruncated ids per cleaned text, BOS and EOS included (call under `_lock`)."""
    return [len(x) for x in tok(texts, verbose=False, return_attention_mask=False).input_ids]


def _fits(text: str) -> bool:
    """A cleaned text that surely fits without tokenizing it: ASCII with at most 75 characters
    besides spaces. Each token holds at least one byte of a word (byte-level BPE; spaces are
    not tokens), and the tokenizer's own normalizing (NFC, lowercase) keeps ASCII as it is."""
    return text.isascii() and len(text) - text.count(" ") <= MAX_LENGTH - 2


# Counting a long list of prompts (a dry run over a manifest) without running the whole
# tokenizer on each: BPE merges never cross the pieces the pre-tokenizer splits a text into, so a
# text's token count is the sum of its pieces' counts, each piece tokenized once (by the tokenizer
# itself) and remembered. That needs the pre-tokenizer's split, which this module writes out only
# for printable ASCII without `<|` (the special tokens are matched before the split): there the
# tokenizer's normalizer (NFC, whitespace, lowercase) changes nothing and its pattern
# (`tokenizer.json`: `'s|'t|...|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`) reads as below. Any other
# text is tokenized whole. `tests/test_tokenizer.py` compares both ways over random texts.
_ASCII_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
_PIECE_CACHE_SIZE = 1 << 17  # pieces remembered (cleared when full): a vocabulary's worth
_piece_tokens: dict[str, int] = {}


def _plain(text: str) -> bool:
    """Printable ASCII without an HTML entity or a special token's opening: `clean_prompt`
    (ftfy changes no such text) is only whitespace and case, and the pieces are `_ASCII_PIECES`."""
    return text.isascii() and text.isprintable() and "&" not in text and "<|" not in text


def _count_pieces(texts: list[str]) -> list[int]:
    """Tokens of each cleaned `_plain` text (BOS and EOS not counted), piece by piece."""
    split = [_ASCII_PIECES.findall(text) for text in texts]
    new = sorted({piece for pieces in split for piece in pieces} - _piece_tokens.keys())
    if len(_piece_tokens) + len(new) > _PIECE_CACHE_SIZE:
        _piece_tokens.clear()
        new = sorted({piece for pieces in split for piece in pieces})
    if new:
        tok = get_tokenizer()
        with _lock:
            ids = tok(new, add_special_tokens=False, verbose=False, return_attention_mask=False).input_ids
        _piece_tokens.update(zip(new, map(len, ids)))
    return [sum(map(_piece_tokens.__getitem__, pieces)) for pieces in split]


def dropped_tokens(prompts: Sequence[str]) -> list[int]:
    """How many tokens `tokenize` drops from the end of each prompt: those beyond CLIP's 75
    (0 when it fits). The same cleaning and tokenizer as `tokenize`, without the ids tensor or
    the warning, and cheap over a long list: a prompt short enough to fit whatever it says is not
    tokenized (`_fits`), plain ASCII is counted piece by piece (`_count_pieces`, ~10x faster than
    tokenizing it), the rest in one tokenizer call."""
    if isinstance(prompts, str):
        raise TypeError("dropped_tokens() takes a sequence of prompts, not a single str")
    dropped = [0] * len(prompts)
    plain: list[tuple[int, str]] = []
    other: list[tuple[int, str]] = []
    for i, prompt in enumerate(prompts):
        if _plain(prompt):
            text = " ".join(prompt.split()).lower()  # = clean_prompt(prompt) here, much faster
            if not _fits(text):
                plain.append((i, text))
        else:
            text = clean_prompt(prompt)
            if not _fits(text):
                other.append((i, text))
    for i, n in zip((i for i, _ in plain), _count_pieces([text for _, text in plain])):
        dropped[i] = max(0, n - (MAX_LENGTH - 2))
    if other:
        tok = get_tokenizer()
        with _lock:
            lengths = _lengths(tok, [text for _, text in other])
        for (i, _), n in zip(other, lengths):
            dropped[i] = max(0, n - MAX_LENGTH)
    return dropped
