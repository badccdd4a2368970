"""The secret-scrubbing log filter: tokens, keys and passwords never reach a sink."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = (
    "FINGERPRINT_LENGTH",
    "MIN_SECRET_LENGTH",
    "SECRET_MARKER",
    "UNLOGGABLE_MARKER",
    "Scrubber",
    "ScrubbingFilter",
    "extra_fields",
    "fingerprint",
    "forget_secret",
    "is_credential_name",
    "register_secret",
)

# Not a password: the text that stands in for one.
SECRET_MARKER = "[REDACTED]"  # noqa: S105
UNLOGGABLE_MARKER = "[unloggable record]"
FINGERPRINT_LENGTH = 12
# Shorter values would match ordinary words and numbers all over the logs.
MIN_SECRET_LENGTH = 8

_MAX_DEPTH = 16
_TRUNCATED = "[truncated]"
_MARKER = re.compile(r"\[REDACTED(?::[0-9a-f]{12})?\]")
_FINGERPRINT_SHAPE = re.compile(r"[0-9a-f]{12}")

# Every attribute a bare LogRecord has, plus those Formatter.format and Python
# 3.12 add; anything else on a record came in through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}

# Key names (lower case, "_" read as "-") whose values are credentials.
_CREDENTIAL_NAMES = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "ocp-apim-subscription-key",
        "subscription-key",
        "x-api-key",
        "x-functions-key",
        "api-key",
        "access-token",
        "id-token",
        "refresh-token",
        "token",
        "assertion",
        "client-secret",
        "client-assertion",
        "code",
        "password",
        "passwd",
        "secret",
        "cookie",
        "set-cookie",
        "private-key",
    }
)
_CREDENTIAL_NAME_PART = re.compile(
    "token|secret|password|passwd|authorization|apikey|api-key|subscription-key"
)
# Private members of a JWK (RFC 7518 §6.3.2, §6.4.1); "oth" holds more primes.
_JWK_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})
# Values of these names are guessable (passwords, cookies), so a hash of them
# would let a reader test candidates; they get the bare marker.
_UNCORRELATED_NAME_PART = re.compile("(?i)password|passwd|secret|cookie|private")


def fingerprint(value: str | bytes) -> str:
    """A short SHA-256 prefix that correlates log lines without revealing ``value``."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(value).hexdigest()[:FINGERPRINT_LENGTH]


def is_credential_name(name: str) -> bool:
    """Whether a field, header or key called ``name`` holds a credential."""
    key = name.lower().replace("_", "-")
    return key in _CREDENTIAL_NAMES or _CREDENTIAL_NAME_PART.search(key) is not None


# Field names of log records come from the code (``extra=`` keys), a small set:
# remembered, since every access line asks again for each of its fields.
_is_field_credential = functools.lru_cache(maxsize=512)(is_credential_name)


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The attributes a record got through ``extra=``, in insertion order."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES}


# --- value patterns -------------------------------------------------------------
#
# Python's `re` backtracks, so each pattern is written to be linear on any input:
# runs are possessive (`*+`, `++`) or bounded, and a pattern that can fail after
# a long run only starts at the beginning of that run (a lookbehind), so no
# character is rescanned from many start positions (CWE-1333, catalog L-14).

_B64URL = "[A-Za-z0-9_-]"
# A value ends at any quote, a line break, or an escaped line break or quote
# inside a repr. Credentials never contain quotes, so ending early there leaves
# nothing of a real credential behind. Values are non-empty: an empty one hides
# nothing and would only cost a replacement call.
_VALUE_BODY = r"(?:[^'\"\\\r\n]|\\(?![rn'\"]))++"
_WORD_BODY = r"(?:[^\s'\"<>,;&\\]|\\(?![rnt'\"]))++"
_SEPARATOR = r"[ \t]{0,8}[:=][ \t]{0,8}"
_NOT_QUOTED = r"(?!b?\\?['\"])"

# Compact JWS (RFC 7515 §7.1) and JWE (RFC 7516 §7.1). These say where a canonical
# token ends; the lenient pattern below is the one that scans, because every
# string these match is also a lenient match (same characters, longer minimum).
_JWS_STRICT = re.compile(
    rf"(?<!{_B64URL})eyJ{_B64URL}{{8,}}+\.{_B64URL}{{8,}}+\.{_B64URL}*+"
)
_JWE_COMPACT = re.compile(
    rf"(?<!{_B64URL})eyJ{_B64URL}{{8,}}+\.{_B64URL}*+\.{_B64URL}{{8,}}+"
    rf"\.{_B64URL}++\.{_B64URL}++"
)
# python-jose accepts `=` padding and junk characters inside segments (catalog
# J-15), and logs may hold a token URL-encoded or JSON-escaped, so anything from
# `eyJ` to the next whitespace, quote, `<`, `>`, `,` or `;` is a token.
_JWT_LENIENT = re.compile(r"eyJ[^\s\"'<>,;]{16,}+")

_SCHEME_CREDENTIAL = re.compile(
    r"(?i)(?<![\w-])(?P<scheme>bearer|basic|negotiate|token)[ \t]++"
    r"(?P<value>(?:[^\s'\"<>,;\\]|\\(?![rnt'\"]))++)"
)
# Header lines whose value runs to the end of the line (schemes, cookie lists).
_HEADER_LINE = re.compile(
    r"(?i)(?<![\w-])(?P<name>(?:proxy[-_])?authorization|(?:set[-_])?cookie)"
    rf"(?![\w-]){_SEPARATOR}{_NOT_QUOTED}(?P<value>{_VALUE_BODY})"
)
# Credential names written `name: value` or `name=value` without quotes: header
# lines, key=value logs, connection strings (`AccountKey=...;`). Query strings
# (`?name=`, `&name=`) are left to the query rule, whose values end at `#`.
_NAMED_FIELD = re.compile(
    r"(?i)(?<![\w?&#-])(?P<name>ocp[-_]apim[-_]subscription[-_]key|subscription[-_]key"
    r"|x[-_](?:api|functions)[-_]key|api[-_]?key|(?:access|id|refresh)[-_]token"
    r"|client[-_](?:secret|assertion)|passw(?:or)?d|private[-_]key"
    r"|account[-_]?key|shared[-_]?access[-_]?(?:key|signature))"
    rf"(?![\w-]){_SEPARATOR}{_NOT_QUOTED}(?P<value>{_WORD_BODY})"
)
# Any key with a quoted value, as dict reprs, JSON, kwargs reprs and CIMultiDict
# reprs write it; the replacement decides by the key name.
_QUOTED_FIELD = re.compile(
    r"(?:(?P<kq>\\?['\"])|(?<![\w.-]))(?P<name>[A-Za-z_][\w.-]{0,63}+)(?(kq)(?P=kq))"
    rf"{_SEPARATOR}(?P<vq>b?\\?['\"])(?P<value>{_VALUE_BODY})"
)
_QUERY_CREDENTIAL = re.compile(
    r"(?i)(?P<sep>[?&#]|%3F|%26|%23)(?P<name>access_token|id_token|refresh_token"
    r"|token|code|subscription[-_]key|api[-_]?key|sig|signature|client_secret"
    r"|client_assertion|assertion|password)(?:=|%3D)"
    r"(?P<value>(?:[^&#\s'\"<>%\\]|%(?!2[36])|\\(?![rn'\"]))++)"
)
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[^-]|-(?!----))*+"
    r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY-----)?"
)
# `scheme://userinfo@`: the run after `://` cannot hold `/`, so runs never
# overlap and backtracking to the last `@` stays linear.
_URL_USERINFO = re.compile(r"://(?P<value>[^\s/?#'\"<>\\]+)@")

# A long base64url run with upper case, lower case and digits: a signature or key
# logged without its context (a token split across two fields). Hex ids, GUIDs
# and traceparent have one letter case, so they never qualify (catalog L-16).
_OPAQUE_RUN = re.compile(rf"(?<!{_B64URL}){_B64URL}{{64,}}+")

_SCHEME_PREFIX = re.compile(r"(?i)(?P<scheme>bearer|basic|negotiate|token)[ \t]+")
_AUTH_PARAMETER = re.compile(r"(?i)(?:realm|scope|error(?:_description|_uri)?)=")
# Words that follow "Bearer"/"Basic" in prose ("missing bearer token in the
# header"); any other word after a scheme is treated as a credential.
_PROSE_WORDS = frozenset(
    "a an and auth authentication authorization challenge credential credentials "
    "expected expired for format from header headers in invalid is missing must "
    "not of only or prefix required scheme schemes should string the to token "
    "tokens type value was with without".split()
)
_SECRET_CHARACTERS = re.compile(r"[A-Za-z0-9%=\\]")
_TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9_.-]*+")
_NON_TOKEN_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]++")
_ENCODED_DOT = re.compile(r"(?<!%)%2[Ee]")
_DIGIT = re.compile(r"[0-9]")


def _is_marker(value: str) -> bool:
    """Whether ``value`` is a marker already, maybe with trailing punctuation."""
    if "[REDACTED" not in value:
        return False
    value = value.strip()
    found = _MARKER.match(value)
    return found is not None and not _SECRET_CHARACTERS.search(value, found.end())


def _canonical_token(value: str) -> str:
    """The token a spelling stands for, so every spelling gets one fingerprint."""
    if _TOKEN_CHARACTERS.fullmatch(value):
        return value
    if not value.startswith("eyJ"):
        return urllib.parse.unquote(value)
    # Not a full unquote: in "%%%%A1" the junk group python-jose skips would
    # swallow two signature characters. A backslash starts a repr escape
    # (b'...\x01') that follows the token.
    value = _ENCODED_DOT.sub(".", value.split("\\", 1)[0])
    return _NON_TOKEN_CHARACTERS.sub("", value)


def _marker(value: str, *, correlate: bool) -> str:
    if not correlate:
        return SECRET_MARKER
    return f"[REDACTED:{fingerprint(_canonical_token(value))}]"


def _correlates(name: str) -> bool:
    return _UNCORRELATED_NAME_PART.search(name) is None


def _keeps_value(name: str, value: str) -> bool:
    """A fingerprint field (``token_fp``) is a hash already, safe to show."""
    key = name.lower().replace("_", "-")
    suffixed = key.endswith(("-fp", "-fingerprint"))
    return suffixed and _FINGERPRINT_SHAPE.fullmatch(value) is not None


def _redact_credential(name: str, value: str) -> str:
    """The redacted form of a credential value; a leading scheme word is kept."""
    if not value.strip() or _is_marker(value):
        return value
    correlate = _correlates(name)
    prefix = ""
    scheme = _SCHEME_PREFIX.match(value)
    if scheme and scheme.end() < len(value):
        prefix, value = value[: scheme.end()], value[scheme.end() :]
        correlate = correlate and scheme["scheme"].lower() != "basic"
        if _is_marker(value):
            return prefix + value
    return prefix + _marker(value, correlate=correlate)


def _splice(match: re.Match[str], replacement: str) -> str:
    """The whole match with its ``value`` group replaced."""
    start, end = match.span("value")
    offset = match.start()
    text = match[0]
    return text[: start - offset] + replacement + text[end - offset :]


def _replace_named(match: re.Match[str]) -> str:
    return _splice(match, _redact_credential(match["name"], match["value"]))


def _replace_quoted_field(match: re.Match[str]) -> str:
    name, value = match["name"], match["value"]
    # "code" alone is a credential only in a query string or a structured field:
    # in text it is far more often an error code ({"code": "TokenExpired"}).
    if name.lower() == "code" or not is_credential_name(name):
        return match[0]
    if _keeps_value(name, value):
        return match[0]
    return _replace_named(match)


def _replace_jwt(match: re.Match[str]) -> str:
    text = match[0]
    canonical = _JWE_COMPACT.match(text) or _JWS_STRICT.match(text)
    if canonical is None:
        return _marker(text, correlate=True)
    tail = text[canonical.end() :]
    # Give back trailing punctuation (a closing bracket) but never token material.
    if _SECRET_CHARACTERS.search(tail):
        return _marker(text, correlate=True)
    return _marker(canonical[0], correlate=True) + tail


def _reads_as_prose(scheme: str, value: str) -> bool:
    if "=" in value and _AUTH_PARAMETER.match(value):
        return True
    word = value.rstrip(".:!?)")
    if scheme.lower() == "token":
        # "token" is mostly an English word; only credential-shaped runs count.
        return len(word) < 8 or _DIGIT.search(word) is None
    return word.lower() in _PROSE_WORDS


def _replace_scheme_credential(match: re.Match[str]) -> str:
    scheme, value = match["scheme"], match["value"]
    if _is_marker(value) or _reads_as_prose(scheme, value):
        return match[0]
    return _splice(match, _marker(value, correlate=scheme.lower() != "basic"))


def _replace_opaque_run(match: re.Match[str]) -> str:
    run = match[0]
    mixed_case = run.lower() != run != run.upper()
    if mixed_case and _DIGIT.search(run):
        return _marker(run, correlate=True)
    return run


def _replace_userinfo(match: re.Match[str]) -> str:
    return _splice(
        match, match["value"] if _is_marker(match["value"]) else SECRET_MARKER
    )


def _replace_pem(match: re.Match[str]) -> str:
    return SECRET_MARKER


@dataclass(frozen=True, slots=True)
class _Rule:
    """A value pattern, its replacement, and what text it can possibly match.

    A rule is skipped when the lower-cased text holds none of its triggers or is
    shorter than its shortest match, which keeps ordinary records cheap.
    """

    pattern: re.Pattern[str]
    triggers: re.Pattern[str]
    replace: Callable[[re.Match[str]], str]
    min_length: int = 0

    def apply(self, text: str, folded: str) -> str:
        if len(text) < self.min_length or not self.triggers.search(folded):
            return text
        return self.pattern.sub(self.replace, text)


def _rule(
    pattern: re.Pattern[str],
    triggers: Iterable[str],
    replace: Callable[[re.Match[str]], str],
    min_length: int = 0,
) -> _Rule:
    found = re.compile("|".join(re.escape(trigger) for trigger in triggers))
    return _Rule(pattern, found, replace, min_length)


# Order matters: whole fields first (they keep a scheme word and fingerprint the
# credential), then query strings, then bare tokens, then scheme words anywhere,
# then whatever long opaque run is left.
_RULES = (
    _rule(_PEM_PRIVATE_KEY, ["private key-----"], _replace_pem),
    _rule(_URL_USERINFO, ["://"], _replace_userinfo),
    _rule(_QUOTED_FIELD, ["'", '"'], _replace_quoted_field),
    _rule(_HEADER_LINE, ["authorization", "cookie"], _replace_named),
    _rule(
        _NAMED_FIELD,
        ["key", "token", "secret", "assertion", "pass", "signature"],
        _replace_named,
    ),
    _rule(_QUERY_CREDENTIAL, ["=", "%3d"], _replace_named),
    _rule(_JWT_LENIENT, ["eyj"], _replace_jwt, min_length=19),
    _rule(
        _SCHEME_CREDENTIAL,
        ["bearer", "basic", "negotiate", "token"],
        _replace_scheme_credential,
    ),
    _rule(_OPAQUE_RUN, [""], _replace_opaque_run, min_length=64),
)


# Every rule's triggers at once, for the common case: a short value (an access
# line's method, path, address, ids) that holds none of them, which no rule can
# change. Texts as long as the opaque-run rule's minimum always take every rule.
_ANY_TRIGGER = re.compile(
    "|".join(rule.triggers.pattern for rule in _RULES if rule.triggers.pattern)
)
_ALWAYS_SCANNED = min(
    (rule.min_length for rule in _RULES if not rule.triggers.pattern),
    default=sys.maxsize,
)


def _as_text(value: bytes | bytearray | memoryview) -> str:
    return bytes(value).decode("utf-8", "backslashreplace")


class Scrubber:
    """Removes credentials from text and from structured values.

    Holds the value patterns (shared by every instance) and a set of exact secret
    values known to this process, replaced wherever they occur. Thread-safe: the
    secret set is swapped whole under a lock and read without one.
    """

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        for secret in secrets:
            self.add_secret(secret)

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        """The compiled value patterns, in the order they are applied."""
        return tuple(rule.pattern for rule in _RULES)

    def add_secret(self, value: str | bytes) -> None:
        """Replace ``value`` (and its URL-encoded form) wherever it occurs."""
        spellings = _spellings(value)
        with self._lock:
            known = set(self._secrets) | spellings
            # Longest first, so a secret that contains another goes out whole.
            self._secrets = tuple(sorted(known, key=len, reverse=True))

    def remove_secret(self, value: str | bytes) -> None:
        """Stop replacing ``value``; patterns still apply to it."""
        spellings = _spellings(value)
        with self._lock:
            self._secrets = tuple(s for s in self._secrets if s not in spellings)

    def scrub(self, text: str) -> str:
        """``text`` minus every credential the patterns or known secrets find."""
        for secret in self._secrets:
            # Exact secrets go first: a pattern that matched part of one could
            # otherwise leave the rest of it behind.
            text = text.replace(secret, SECRET_MARKER)
        folded = text.lower()
        if len(text) < _ALWAYS_SCANNED and _ANY_TRIGGER.search(folded) is None:
            # No rule would apply: each skips a text without its triggers.
            return text
        for rule in _RULES:
            text = rule.apply(text, folded)
        return text

    def scrub_value(self, obj: object) -> object:
        """A copy of ``obj`` safe to log: strings scrubbed, credential keys replaced.

        Dicts (and any mapping), lists, tuples and sets are walked; bytes become
        text (undecodable bytes backslash-escaped); other objects become their
        scrubbed ``str()``. Nesting deeper than 16 levels is cut off.
        """
        return self._scrub_any(obj, 0)

    def scrub_field(self, name: object, value: object) -> object:
        """Like ``scrub_value``, for a value stored under the key ``name``."""
        return self._scrub_item(name, value, 0)

    def scrub_record_field(self, name: str, value: object) -> object:
        """``scrub_field`` for a record attribute set through ``extra=``."""
        if _is_field_credential(name):
            return _redact_field(name, value)
        return self._scrub_any(value, 0)

    def _scrub_item(self, name: object, value: object, depth: int) -> object:
        if isinstance(name, str) and is_credential_name(name):
            return _redact_field(name, value)
        return self._scrub_any(value, depth)

    def _scrub_any(self, value: object, depth: int) -> object:
        # Exact types first: most values are plain strings and numbers.
        if type(value) is str:
            return self.scrub(value)
        kind = type(value)
        if value is None or kind is int or kind is float or kind is bool:
            return value
        if isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return self.scrub(_as_text(value))
        if depth >= _MAX_DEPTH:
            return _TRUNCATED
        if isinstance(value, Mapping):
            return self._scrub_mapping(value, depth + 1)
        if isinstance(value, list | tuple | set | frozenset):
            return self._scrub_collection(value, depth + 1)
        return self.scrub(str(value))

    def _scrub_mapping(self, mapping: Mapping[object, object], depth: int) -> object:
        is_jwk = "kty" in mapping
        clean: dict[object, object] = {}
        for key, value in mapping.items():
            clean_key = self._scrub_any(key, depth)
            if is_jwk and key in _JWK_PRIVATE_MEMBERS:
                clean[clean_key] = SECRET_MARKER
            else:
                clean[clean_key] = self._scrub_item(key, value, depth)
        return clean

    def _scrub_collection(
        self,
        items: list[object] | tuple[object, ...] | set[object] | frozenset[object],
        depth: int,
    ) -> object:
        clean = [self._scrub_any(item, depth) for item in items]
        if isinstance(items, list):
            return clean
        if isinstance(items, tuple):
            return tuple(clean)
        return set(clean) if isinstance(items, set) else frozenset(clean)


def _spellings(value: str | bytes) -> set[str]:
    text = _as_text(value) if isinstance(value, bytes) else value
    if len(text) < MIN_SECRET_LENGTH:
        return set()
    return {text, urllib.parse.quote(text, safe="")}


def _redact_field(name: str, value: object) -> object:
    # None and booleans ("has_token": True) say nothing about the secret.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        value = _as_text(value)
    if isinstance(value, str):
        return value if _keeps_value(name, value) else _redact_credential(name, value)
    return SECRET_MARKER


_DEFAULT_SCRUBBER = Scrubber()


def register_secret(value: str | bytes) -> None:
    """Scrub ``value`` by exact match from now on; values under 8 chars are ignored."""
    _DEFAULT_SCRUBBER.add_secret(value)


def forget_secret(value: str | bytes) -> None:
    """Stop scrubbing ``value`` by exact match (a revoked key, a rotated password)."""
    _DEFAULT_SCRUBBER.remove_secret(value)


class ScrubbingFilter(logging.Filter):
    """A handler filter that rewrites each record so that no credential remains.

    Install it on handlers, not loggers: a logger's filters never see records
    from its descendants (``aiohttp.server``, ``asyncio``), a handler's see every
    record it emits. The message is rendered once and ``args`` cleared, so no
    later handler can render the raw values again; the traceback is rendered to
    ``exc_text`` and ``exc_info`` cleared for the same reason.
    """

    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber if scrubber is not None else _DEFAULT_SCRUBBER

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._scrub(record)
        except Exception:
            # Fail closed (catalog L-15): whatever went wrong, the raw record
            # must not go out, and the caller's request must not fail.
            _blank(record)
        return True

    def _scrub(self, record: logging.LogRecord) -> None:
        scrub = self.scrubber.scrub
        message = scrub(record.getMessage())
        exc_text = self._exception_text(record)
        stack = scrub(record.stack_info) if record.stack_info else None
        scrub_field = self.scrubber.scrub_record_field
        extras = {
            name: scrub_field(name, value)
            for name, value in extra_fields(record).items()
        }

        record.msg, record.args = message, None
        record.exc_info, record.exc_text, record.stack_info = None, exc_text, stack
        for name, value in extras.items():
            setattr(record, name, value)
        if "message" in vars(record):
            # An earlier handler's Formatter cached the raw rendering here.
            record.message = message

    def _exception_text(self, record: logging.LogRecord) -> str | None:
        exc_info = record.exc_info
        if exc_info is not None and exc_info[1] is not None:
            # format_exception follows __cause__, __context__, notes and
            # exception groups, and never shows frame locals.
            lines = traceback.format_exception(exc_info[0], exc_info[1], exc_info[2])
            return self.scrubber.scrub("".join(lines).rstrip("\n"))
        return self.scrubber.scrub(record.exc_text) if record.exc_text else None


def _blank(record: logging.LogRecord) -> None:
    record.msg, record.args = UNLOGGABLE_MARKER, None
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    for name in extra_fields(record):
        delattr(record, name)
    if "message" in vars(record):
        record.message = UNLOGGABLE_MARKER
