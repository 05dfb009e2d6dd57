"""Names are injective: distinct ids never give the same image key, also on case-insensitive
file systems (property-based, over adversarial ids)."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.manifest import MAX_NAME, safe_name

# Separators, case pairs, characters that change under case folding or Unicode normalisation,
# and the two spellings of "é" (precomposed, and e + combining accent).
TOKENS = list('aA0._-/\\ :*?"<>|\x00\n%ßẞİıK\u212a\u0301é') + ["e\u0301", "\u00e9", "-0123456789abcdef"]


def _ids(min_size: int = 0, max_size: int = 12):
    return st.lists(st.sampled_from(TOKENS), min_size=min_size, max_size=max_size).map("".join)


ADVERSARIAL = st.one_of(_ids(), st.text(max_size=20), _ids(min_size=90, max_size=160))


def _key(name: str) -> str:
    return name.casefold()  # what a case-insensitive file system compares


@settings(max_examples=200, deadline=None)
@given(st.lists(ADVERSARIAL, min_size=2, max_size=8, unique=True))
def test_distinct_ids_get_distinct_names(ids):
    names = [safe_name(i) for i in ids]
    assert len({_key(n) for n in names}) == len(ids), dict(zip(ids, names))


@settings(max_examples=200, deadline=None)
@given(ADVERSARIAL)
def test_names_are_safe_file_names(row_id):
    name = safe_name(row_id)
    assert 0 < len(name) <= MAX_NAME
    assert not name.startswith(".") and "/" not in name and "\x00" not in name
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


def test_the_known_collisions_are_gone():
    hashed = safe_name("a b")
    assert safe_name(hashed) != hashed  # an id that looks like a hashed name is hashed too
    assert _key(safe_name("Cat")) != _key(safe_name("cat")) != _key(safe_name("CAT"))
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert safe_name(nfc) != safe_name(nfd)
    assert safe_name("x" * 200) != safe_name("x" * 201)
    assert safe_name("cat-001_v2.final") == "cat-001_v2.final"
    assert safe_name("\ud800") != safe_name("\ud801")  # lone surrogates still hash
