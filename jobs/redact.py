"""Secrets out of text: URIs inside any message (our own, or an exception's from boto3/botocore,
urllib3, PIL) lose their userinfo and their secret query parameters before they are stored,
printed or logged.

`storage.redact_uri` cleans one URI (and drops its whole query string); `redact_text` finds URIs
and secret-looking `key=value` pairs inside free text and keeps the rest of the text.
"""

from __future__ import annotations

import re

# scheme://user[:password]@host -> scheme://host. A password may hold `/` (AWS secret keys do),
# so `user:` followed by anything but spaces and quotes up to the first `@` is userinfo too; a
# path's `@` (s3://bucket/a@b.png) is not, as no `:` comes before its first `/`.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s@\"'<>:]*:[^\s@\"'<>]*|[^/\s@\"'<>]*)@")
# query parameters and `key=value` pairs that carry credentials (presigned S3 URLs, tokens)
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>\b(?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
    r"access[_-]?token|secret|password|passwd|pwd|aws_secret_access_key|aws_session_token|"
    r"api[_-]?key|apikey|awsaccesskeyid)=)(?P<value>[^&\s\"'<>]+)"
)
REDACTED = "REDACTED"


def strip_userinfo(text: str) -> str:
    """`text` with the userinfo of every URI in it removed."""
    return _USERINFO.sub(lambda m: m.group("scheme"), str(text))


def redact_text(text: str) -> str:
    """`text` with userinfo removed from every URI and secret parameter values replaced."""
    text = strip_userinfo(text)
    return _SECRET_PARAM.sub(lambda m: m.group("key") + REDACTED, text)


__all__ = ["REDACTED", "redact_text", "strip_userinfo"]
