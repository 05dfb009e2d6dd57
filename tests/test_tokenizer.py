"""sdcore.tokenizer against OpenAI CLIP's reference tokenizer (open_clip's SimpleTokenizer).

open_clip is installed without its dependencies (importing the package fails without
torchvision), so its `tokenizer.py` is loaded by file path; it needs only ftfy, regex and torch.

Known, deliberately untested differences (no real prompt has them): transformers' tokenizer
NFC-composes after lowercasing, so a capital or fullwidth letter followed by a stray combining
mark ("Ϊ́", "Ｔ̈") can tokenize differently; and the reference silently drops a lone U+0345.
"""

import importlib.util
import random
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from sdcore import tokenizer as sdtok
from sdcore.tokenizer import BOS_ID, EOS_ID, PromptTruncatedWarning, clean_prompt, get_tokenizer, tokenize

CORPUS = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo Of A CAT, ALL CAPS",
    "masterpiece, best quality, (detailed:1.2), [blurry], {foo|bar}",
    "Hello,World!!!...??? -- ~~ @user #tag $5 100% a+b=c 'quoted' \"double\"",
    "It's they'll we've I'M you'd she'S",
    "1234567890 3.14159 1e-5 2024-01-01 0x1F",
    "café naïve Ünïcödé Ångström straße ÆØÅ İstanbul",
    "東京タワー 夜景, 한국어 텍스트, русский текст, العربية, עברית, ελληνικά",
    "ΟΔΥΣΣΕΥΣ ΣΑΣ ΑΣ, σας",  # Greek final sigma: str.lower is context-sensitive
    "emoji 😀👍🏽 🐱‍👤 🇫🇷 ❤️ ✨",
    "I&amp;D &lt;b&gt;bold&lt;/b&gt; &#39;x&#39; &quot;q&quot; &amp;amp; &nbsp;x &copy;",
    "“curly quotes” ‘single’ — em dash – en dash … ellipsis",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁne ﬂow ligatures",
    "Ã©mojibake cafÃ©",
    "  leading and trailing spaces\t\ttabs\nnew\r\nlines\u00a0nbsp\u3000ideographic  ",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a photo of a cat, " * 40,  # long: truncated
]

LONG = "a portrait of an astronaut riding a horse on mars, " * 8


@pytest.fixture(scope="module")
def reference():
    """OpenAI CLIP's tokenize(texts) -> (B, 77), padded with 0, as open_clip ships it."""
    spec = importlib.util.find_spec("open_clip")  # locates without importing
    if spec is None:
        pytest.skip("open-clip-torch not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _reference_ids(reference, prompt):
    """Reference ids with SD's padding: open_clip pads with 0, SD 1.x with EOS."""
    ref = reference.tokenize([prompt])[0]
    n = int((ref == EOS_ID).nonzero()[0]) + 1  # BOS ... EOS
    assert torch.all(ref[n:] == 0)
    out = torch.full((77,), EOS_ID, dtype=torch.long)
    out[:n] = ref[:n]
    return out


def _fuzz_corpus(n=200, seed=0):
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`")
        + list("éüñøßÆçİıΣσЖжअ漢字かナ한ー")
        + ["😀", "👍🏽", "\u200d", "️", "ｆ", "ﬁ", "’", "“", "—", "…", "\u00a0", "&amp;", "&lt;", "&#39;", "'s", "'ll"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_vocab_is_clip_vit_l14():
    tok = get_tokenizer()
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (49406, 49407, 49407, 49407)
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tok.model_max_length == 77
    # Well-known CLIP ids, independent of open_clip.
    assert tokenize(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_shipped_files_match_derivation(reference, tmp_path):
    build = importlib.util.spec_from_file_location("_build_vocab", sdtok.VOCAB_DIR / "build_vocab.py")
    mod = importlib.util.module_from_spec(build)
    build.loader.exec_module(mod)
    src = Path(reference.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    vocab, merges = mod.derive(src)
    mod.write(vocab, merges, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (sdtok.VOCAB_DIR / name).read_bytes(), name
    # Same vocabulary as the reference tokenizer, special tokens renamed to CLIP's spelling.
    ref = reference.SimpleTokenizer()
    expected = dict(ref.encoder)
    expected["<|startoftext|>"] = expected.pop("<start_of_text>")
    expected["<|endoftext|>"] = expected.pop("<end_of_text>")
    assert vocab == expected


@pytest.mark.parametrize("corpus", ["handpicked", "fuzz"])
def test_ids_match_reference(reference, corpus):
    prompts = CORPUS if corpus == "handpicked" else _fuzz_corpus()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = tokenize(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    for row, prompt in zip(ids, prompts):
        assert row.tolist() == _reference_ids(reference, prompt).tolist(), repr(prompt)


def test_padding_is_eos():
    ids = tokenize(["", "a cat"])
    assert ids[0].tolist() == [BOS_ID] + [EOS_ID] * 76
    assert ids[1, :4].tolist() == [BOS_ID, 320, 2368, EOS_ID]
    assert torch.all(ids[1, 4:] == EOS_ID)


def test_truncation_warns_and_keeps_77_ending_in_eos(reference):
    n_tokens = len(reference.SimpleTokenizer().encode(LONG))
    assert n_tokens > 75
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = tokenize(["short prompt", LONG])
    assert len(record) == 1
    message = str(record[0].message)
    assert LONG[:30] in message and f"last {n_tokens - 75} tokens were dropped" in message
    assert ids.shape == (2, 77)
    assert ids[1, 0] == BOS_ID and ids[1, -1] == EOS_ID and torch.all(ids[1, 1:-1] != EOS_ID)
    # SimpleTokenizer truncates to 77 and overwrites the last id with EOS: same ids.
    assert ids[1].tolist() == reference.tokenize([LONG])[0].tolist()


def test_truncation_boundary():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        exact = tokenize(["cat " * 75])  # 75 tokens + BOS + EOS = 77: fits, no warning
    assert exact[0].tolist() == [BOS_ID] + [2368] * 75 + [EOS_ID]
    with pytest.warns(PromptTruncatedWarning, match="last 1 tokens were dropped"):
        over = tokenize(["cat " * 76])
    assert over.tolist() == exact.tolist()


def test_literal_special_token_in_prompt_is_special():
    # As OpenAI CLIP and transformers: the literal text is the special token, not characters.
    assert tokenize(["a<|endoftext|>b"])[0, :5].tolist() == [BOS_ID, 320, EOS_ID, 321, EOS_ID]


def test_save_pretrained_roundtrip(tmp_path):
    get_tokenizer().save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert (reloaded.pad_token_id, reloaded.model_max_length, len(reloaded)) == (EOS_ID, 77, 49408)
    prompts = CORPUS + _fuzz_corpus(50, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        expected = tokenize(prompts)
    # Exactly diffusers' StableDiffusionPipeline.encode_prompt call, on cleaned prompts.
    got = reloaded(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=reloaded.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert torch.equal(got, expected)
    # And on raw text the reloaded tokenizer behaves as the original one.
    raw = get_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert reloaded(prompts, padding="max_length", max_length=77, truncation=True).input_ids == raw


def test_input_checks():
    with pytest.raises(TypeError):
        tokenize("a cat")
    assert tokenize([]).shape == (0, 77)
    assert get_tokenizer() is get_tokenizer()


def _long_fuzz(n=3000, seed=1):
    """Texts around and past 75 tokens: plain ASCII (counted piece by piece) and the rest."""
    words = ["cat", "photo", "it's", "we're", "I'M", "'s", "''", "8k", "1024", "--", "!!!", "(masterpiece:1.2)"]
    words += ["snake_case", "x" * 30, "supercalifragilistic", "'ll", "'D", "a.b", "\\", "<", "|", ">", "`~"]
    others = ["\t", "\n", "é", "&amp;", "&nGt;", "<|endoftext|>", "ﬁ", "\u00a0", "😀", "İ"]
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        pool = words if i % 2 else words + others
        texts.append(" ".join(rng.choice(pool) for _ in range(rng.randint(1, 110))))
    printable = [chr(c) for c in range(32, 127)]
    texts += ["".join(rng.choice(printable) for _ in range(rng.randint(1, 250))) for _ in range(n)]
    return texts


def test_dropped_tokens_counts_what_tokenize_cuts():
    """`dropped_tokens` (the dry run's and the records' count) equals the tokens the whole
    tokenizer finds past 75, over plain ASCII (counted piece by piece) and any other text."""
    texts = _long_fuzz() + CORPUS + [LONG, "cat " * 75, "cat " * 76, "", "a<|endoftext|>b" * 30]
    tok = get_tokenizer()
    lengths = [len(ids) for ids in tok([clean_prompt(t) for t in texts], verbose=False).input_ids]
    expected = [max(0, n - 77) for n in lengths]
    assert sdtok.dropped_tokens(texts) == expected
    assert sum(1 for n in expected if n) > 1000  # the fuzz reaches past 75 often
    assert sdtok.dropped_tokens(["cat " * 75, "cat " * 76, "", LONG]) == [0, 1, 0, expected[-5]]
    with pytest.warns(PromptTruncatedWarning, match=f"last {expected[-5]} tokens were dropped"):
        tokenize([LONG])
    for text in texts:  # the plain texts' shortcut for clean_prompt
        if sdtok._plain(text):
            assert clean_prompt(text) == " ".join(text.split()).lower(), repr(text)
    with pytest.raises(TypeError):
        sdtok.dropped_tokens("a cat")
