"""Which URIs the project reads and writes, and how any URI is shown.

Allowed: local paths, `file://` and `s3://` (S3 endpoints and credentials come from the
environment, never from the URI). Anything else (`http://`, `memory://`, `zip://...::`,
`data:`, a URI with user-info) is refused by `check_uri` before a byte is read or written:
an input becomes a failed row, an output or checkpoint URI a usage error. `redact` is the one
function that every URI or message goes through before it reaches a log, a manifest, metrics
or checkpoint metadata.
"""

from __future__ import annotations

import re

from model.errors import InputError

ALLOWED_SCHEMES = ("file", "s3")

# "name:" at the start, as in s3://, data:, memory://; a one-letter name is a Windows drive.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# scheme://user:password@ or scheme://user@ inside any text. The password runs to the last '@'
# of its word (passwords may hold '/' or '@'), so a secret is never left half shown.
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s@/:'\"]*:[^\s'\"]*|[^\s@/:'\"]+)@")
_QUERY = re.compile(r"(?P<base>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]*)\?[^\s'\"]*")  # signed URLs carry tokens
# The same without a scheme, as hosts are often given (`user:password@host:port`, `host:port?token=...`).
# `(?!//)`: "s3://bucket/a@b.png" is a scheme and a key with an '@', not user-info.
_BARE_USER_INFO = re.compile(r"(?<![\w.+%-])[\w.+%-]+:(?!//)[^\s'\"]*@(?=[\w\[])")
_BARE_QUERY = re.compile(r"(?P<base>(?<![^\s'\"(=])[^\s?#'\"()]+)\?(?=[^\s'\"()]*=)[^\s'\"()]*")


class UnsupportedURIError(InputError):
    """A URI whose scheme is not allowed, or one that carries credentials."""


def scheme(uri: str) -> str:
    """The URI's scheme in lower case, "" for a local path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def check_uri(uri: str) -> str:
    """The scheme of an allowed URI ("" for a local path); UnsupportedURIError for any other."""
    found = scheme(uri)
    if found and found not in ALLOWED_SCHEMES:
        raise UnsupportedURIError(
            f"{redact(uri)}: the {found!r} scheme is not supported (local paths, file:// and s3:// are)")
    if found and _USER_INFO.search(uri):
        raise UnsupportedURIError(
            f"{redact(uri)}: credentials in a URI are not used; give them in the environment (AWS_* variables)")
    return found


def uri_argument(uri: str) -> str:
    """argparse type of every output, checkpoint and dataset URI: a usage error for a URI
    `check_uri` refuses (inputs of batch jobs are checked per input instead: a failed row)."""
    import argparse

    try:
        check_uri(uri)
    except UnsupportedURIError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return uri


def redact(text: str) -> str:
    """`text` as it may be shown or stored: the user-info and query of every URL in it removed,
    and the undecodable bytes of file names (surrogate escapes) written as \\xNN.

    s3://KEY:SECRET@bucket/x.png -> s3://bucket/x.png; http://h/x?X-Amz-Signature=... -> http://h/x?<redacted>;
    user:secret@host:9091 -> host:9091; host:9091?token=... -> host:9091?<redacted>;
    a local path or text without URLs is unchanged.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = _USER_INFO.sub(r"\g<scheme>", text)
    text = _BARE_USER_INFO.sub("", text)
    text = _QUERY.sub(r"\g<base>?<redacted>", text)
    return _BARE_QUERY.sub(r"\g<base>?<redacted>", text)
