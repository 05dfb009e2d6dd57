"""jobs/errors.py: an error message's reason, without the row's own values, so that rows with
the same problem group together in `status --errors`, summary.json and the report."""

from __future__ import annotations

import pytest

from jobs.errors import error_reason


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
