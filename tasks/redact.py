"""Credentials out of everything stored or logged: URLs with a user and password, signed query
strings, and option keys that name a token or a key.

Secrets belong in Prefect Secret blocks, loaded at run time; these functions catch the ones given
anyway, before they reach a flow run's parameters, a row of the results file or a log line.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://userinfo@ — the userinfo (user:password, or a bare token) is the credential
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s?#]+@")
# Names of options and query parameters whose value is a credential.
_SECRET_NAME = (
    r"(?:[a-z0-9]*[_-])*(?:token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|credentials?|auth|signature|sig)"
)
_SECRET_KEY = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
_SECRET_QUERY = re.compile(rf"(?P<name>[?&]{_SECRET_NAME}=)[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """The text with the credentials of every URL in it masked: `https://***@host/path?token=***`."""
    return _SECRET_QUERY.sub(rf"\g<name>{MASK}", _USERINFO.sub(rf"\g<scheme>{MASK}@", text))


def redact_options(value: Any) -> Any:
    """Options (engine arguments, storage options) with secret-named values masked and URLs redacted."""
    if isinstance(value, dict):
        return {
            key: MASK if isinstance(key, str) and _SECRET_KEY.match(key) and item is not None else redact_options(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_options(item) for item in value]
    return redact(value) if isinstance(value, str) else value
