"""Secrets out of everything idemtask prints, logs or raises: store and broker URLs carry
passwords in their userinfo (``redis://user:secret@host``) and in query parameters
(``?password=``, ``?sentinel_password=``), and the messages that quote them must not."""

from __future__ import annotations

import re

MASK = "***"
#: Query parameters whose value is masked (case-insensitive substrings of the name).
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|secret|key|auth|credential", re.IGNORECASE)
#: A URL inside a message: a scheme, ``://``, then anything up to a space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
#: ``password=value`` outside a URL (a client's repr) and ``'password': 'value'`` (a dict's).
_SECRET_ASSIGNMENT = re.compile(
    r"""(\b[\w-]*(?:password|passwd|secret|token)[\w-]*=|"""
    r"""['"][\w-]*(?:password|passwd|secret|token)[\w-]*['"]:\s*['"]?)([^\s,;&)>'"}]+)""",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo and secret query values replaced by ``***``.

    Handles every form idemtask and the brokers accept: ``redis://``, ``rediss://``,
    ``unix://user:pw@/path``, ``redis+sentinel://`` and ``redis+cluster://`` with several
    ``host:port``. A user name alone (``redis://user@host``) is kept. Text that is not a URL
    is returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The userinfo ends at the last "@": a password with an unescaped "@", "/" or "?" is
    # still masked whole (urllib would cut it short, and that cut is what the client uses).
    userinfo, at, after = rest.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        if colon and not any(c in user for c in "/?#"):
            rest = f"{user}:{MASK}@{after}"
        elif colon or any(c in userinfo for c in "/?#"):
            rest = f"{MASK}@{after}"
    return f"{scheme}://{_redact_query(rest)}"


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it redacted, and any
    ``password=...`` assignment outside URLs masked."""
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    return _SECRET_ASSIGNMENT.sub(lambda match: match.group(1) + MASK, text)


def _redact_query(tail: str) -> str:
    path, question, rest = tail.partition("?")
    if not question:
        return tail
    query, hash_sign, fragment = rest.partition("#")
    pairs = []
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and value and _SECRET_PARAMETER.search(name):
            value = MASK
        pairs.append(f"{name}{equals}{value}")
    return f"{path}?{'&'.join(pairs)}{hash_sign}{fragment}"
