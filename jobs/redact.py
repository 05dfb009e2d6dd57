"""Secrets out of text: URIs inside any message (our own, or an exception's from boto3/botocore,
urllib3, PIL) lose their userinfo and their secret query parameters before they are stored,
printed or logged.

`storage.redact_uri` cleans one URI (an s3:// or file:// one keeps its key or path verbatim, `#`
and `?` included, less secret parameter values; others lose their query and fragment);
`redact_text` finds URIs and secret-looking `key=value` pairs inside free text and keeps the rest
of the text. `without_userinfo` is for a URI that is to be used, not shown: only its own userinfo
goes, the rest (an S3 key) is kept byte for byte.
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


def without_userinfo(uri: str) -> str:
    """`uri` without the userinfo at its start (`s3://KEY:SECRET@bucket/key` -> `s3://bucket/key`);
    the rest is kept verbatim, even a `scheme://user@` inside an S3 key."""
    uri = str(uri)
    match = _USERINFO.match(uri)
    return match.group("scheme") + uri[match.end() :] if match else uri


def redact_params(text: str) -> str:
    """`text` with the values of secret-looking `key=value` pairs replaced (nothing else changed)."""
    return _SECRET_PARAM.sub(lambda m: m.group("key") + REDACTED, str(text))


def redact_text(text: str) -> str:
    """`text` with userinfo removed from every URI and secret parameter values replaced."""
    return redact_params(strip_userinfo(text))


__all__ = ["REDACTED", "redact_params", "redact_text", "strip_userinfo", "without_userinfo"]
