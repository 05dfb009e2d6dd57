"""jobs/errors.py: an error message's reason, without the row's own values, so that rows with
the same problem group together in `status --errors`, summary.json and the report."""

from __future__ import annotations

import pytest

from jobs.errors import error_reason, format_error_rows


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("invalid UTF-8 (not readable) in column(s) prompt", "invalid UTF-8 in column prompt"),
        ("init_image 8000x8000 pixels over the cap of 40000000", "init_image NxN pixels over the cap of N"),
        ("init_image 640x480 pixels over the cap of 40000000", "init_image NxN pixels over the cap of N"),
        ("strength: -0.5 outside (0, 1]", "strength: N outside (N, N]"),
        ("steps: 1000 outside 1..999", "steps: N outside N..N"),
        ("duplicate id 'b' (first used by manifest row 3)", "duplicate id …"),
        ("init_image not found: s3://b/x.png", "init_image not found: …"),
        ("model sha256 mismatch in layer_2", "model sha256 mismatch in layer_2"),
    ],
)
def test_reasons_drop_the_rows_values_and_keep_the_words(message, reason):
    assert error_reason(message) == reason


# Ids as the manifest check quotes them (repr): holding "; " (the separator of a row's problems),
# both quote characters (repr writes \'), a backslash (\\), an apostrophe (repr's "…").
AWKWARD_IDS = ["a; 1", "b; 2", "q\"uo'te", "back\\slash'", "it's", "plain", "x'; y"]


def test_quoted_values_holding_separators_or_escapes_group_as_one_reason():
    """Before: the message was split at "; " inside a quoted id and `'[^']*'` stopped at the
    escaped \\' of repr, so these ids made five reasons, each leaking part of the id."""
    messages = [f"duplicate id {value!r} (first used by manifest row 0)" for value in AWKWARD_IDS]
    assert {error_reason(m) for m in messages} == {"duplicate id …"}
    two = f"duplicate id {'a; 1'!r} (first used by manifest row 0); init_image not found: s3://b/x.png"
    assert error_reason(two) == "duplicate id …; init_image not found: …"


def test_an_apostrophe_in_words_quotes_nothing():
    assert error_reason("prompt can't be read; id 'b' twice") == "prompt can't be read; id … twice"


def test_a_generation_failure_is_one_problem_whatever_its_text_holds():
    """The exception's text may hold "; " itself: it is not a list of the row's problems."""
    message = "generation failed: RuntimeError: shape [2, 4]; expected 'x'; got 3"
    assert error_reason(message) == "generation failed: RuntimeError"


def test_status_errors_shows_ids_and_messages_escaped():
    """Before: an id holding a newline printed a forged row line, one holding ESC [2J cleared the
    terminal. Plain ids print as they are."""
    ids = ["a\nrow 7        id FORGED               shard-00009  all fine", "\x1b[2J\x1b[31mX", "plain", "ü-ok"]
    rows = []
    for number, value in enumerate(ids):
        error = f"duplicate id {value!r} (first used by manifest row 0)"
        rows.append({"row": number, "id": value, "shard": "shard-00000", "error": error, "reason": error_reason(error)})
    rows.append({"row": 9, "id": "r9", "shard": "shard-00000", "error": "raw\x1b[2J", "reason": "raw\x1b[2J"})
    text = format_error_rows(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) and "\x1b" not in text
    assert lines[1] == "  row 0        id 'a\\nrow 7        id FORGED               shard-00009  all fine' " + (
        "shard-00000  duplicate id 'a\\nrow 7        id FORGED               shard-00009  all fine' "
        "(first used by manifest row 0)"
    )
    assert lines[2].startswith("  row 1        id '\\x1b[2J\\x1b[31mX'   shard-00000")
    assert lines[3].startswith("  row 2        id plain                shard-00000")
    assert lines[4].startswith("  row 3        id ü-ok                 shard-00000")
    assert lines[6] == "  row 9        id r9                   shard-00000  'raw\\x1b[2J'"
