"""PII redaction: emails, IPv4 and IPv6 addresses, API keys and tokens, and PEM private-key blocks.

Kinds run in the order private_key, secret, email, ipv6, ipv4: a key block is removed whole before its body
could be mistaken for anything else, and an IPv6 address with an embedded IPv4 tail counts once, as ipv6.
Speed comes from never trying a pattern at every position: secrets are gated by a substring every match
contains and start with a literal; emails and IP addresses are tried only around a rare "hint" (an "@", a
dotted octet, a colon beside a 4-digit group) that a literal-prefixed regex finds (`_anchored_subn`).

False-positive rules, chosen because they cost nothing at match time:
- IPv4: four dotted decimal octets, each 0-255 without leading zeros ("01.02.03.04" is a date or version),
  not preceded by a letter, digit, "_" or "." and not followed by one or by ".digit" (so "v1.2.3.4" and
  "1.2.3.4.5" are versions, not addresses). A bare "1.2.3.4" is still redacted: text alone cannot tell.
- IPv6: a candidate must parse with `ipaddress` and hold a full 4-digit group and a decimal digit, which
  rejects "::", "::1", slices like "x[1::2]" and paths like "a::b" (but not "x[1000::2000]"); an address
  with no 4-digit group, like "1:2:3:4:5:6:7:8", is rare in real text and kept. Times ("12:34:56") and
  MAC addresses never parse.
"""

import ipaddress
import re
from collections.abc import Callable

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ipv4": "<IPV4>",
    "ipv6": "<IPV6>",
    "secret": "<SECRET>",
    "private_key": "<PRIVATE_KEY>",
}

_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----"
    # the whole block; or, when it was cut off before its END line, the header and base64 body that follow
    # (the scan for END stops at the next BEGIN, so many unterminated blocks stay linear, not quadratic)
    r"(?:(?:(?!-----BEGIN).)*?-----END[A-Z0-9 ]*PRIVATE KEY-----|[A-Za-z0-9+/=\s:,.-]*)",
    re.DOTALL,
)

# (needle, pattern): every match contains the needle, and most texts do not, so `in` skips the scan. Each
# pattern starts with a literal where it can (the engine then jumps between its occurrences) and checks its
# left boundary with a lookbehind placed after that literal, which keeps the jump.
_SECRETS: list[tuple[str, re.Pattern[str]]] = [
    ("IA", re.compile(r"A[KS]IA(?<![A-Za-z0-9]....)[0-9A-Z]{16}(?![A-Za-z0-9])", re.ASCII)),  # AWS key id
    ("AIza", re.compile(r"AIza(?<![A-Za-z0-9]....)[0-9A-Za-z_-]{35}(?![\w-])", re.ASCII)),  # Google API key
    ("gh", re.compile(r"gh[pousr]_(?<![A-Za-z0-9]....)[A-Za-z0-9]{36}(?![A-Za-z0-9])", re.ASCII)),  # GitHub
    ("github_pat_", re.compile(r"github_pat_(?<![A-Za-z0-9]...........)[A-Za-z0-9_]{22,255}", re.ASCII)),
    # OpenAI style; the body must hold a digit and a capital, which kebab-case words after "sk-" do not
    ("sk-", re.compile(r"sk-(?<![\w-]...)(?:proj-|svcacct-|admin-)?(?=[\w-]*[0-9])(?=[\w-]*[A-Z])[\w-]{20,}", re.A)),
    ("xox", re.compile(r"xox[abpr]-(?<![A-Za-z0-9].....)[0-9A-Za-z-]{10,}", re.ASCII)),  # Slack
    ("_live_", re.compile(r"(?<![A-Za-z0-9])[sr]k_live_[0-9A-Za-z]{16,}(?![A-Za-z0-9])", re.ASCII)),  # Stripe
]

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])",
    re.ASCII,
)
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_EMAIL_HINT = re.compile(r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9]")

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.[0-9])", re.ASCII)
_IPV4_HINT = re.compile(r"\.[0-9]{1,3}\.[0-9]")  # the first octet's dot

_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:])",
    re.ASCII,
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_IPV6_HINT = re.compile(r":(?:[0-9A-Fa-f]{4}|(?<=[0-9A-Fa-f]{4}:))")  # a colon beside a full 4-digit group
_FULL_GROUP = re.compile(r"[0-9A-Fa-f]{4}")


def is_ipv6(candidate: str) -> bool:
    """Whether `candidate` is an IPv6 address worth redacting (see the module docstring for the rule)."""
    if _FULL_GROUP.search(candidate) is None or not any(c.isdigit() for c in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _anchored_subn(
    text: str,
    hint: re.Pattern[str],
    pattern: re.Pattern[str],
    left: frozenset[str],
    max_left: int,
    placeholder: str,
    accept: Callable[[str], bool] | None = None,
) -> tuple[str, int]:
    """`pattern.subn(placeholder, text)` for a pattern that begins with a lookbehind (so re would try it at
    every position), run only where the rare, fast `hint` matches. From each hint it steps left over at most
    `max_left` characters of `left` to where a match could begin (a match never starts inside such a run,
    which the pattern's lookbehind guarantees), and tries the pattern there. `accept` vets each match."""
    pieces: list[str] = []
    done = 0  # text[:done] is already in pieces
    hits = 0
    for h in hint.finditer(text):
        start = h.start()
        if start < done:
            continue
        stop = max(done, start - max_left)  # never back into the last match, as re.sub resumes at its end
        while start > stop and text[start - 1] in left:
            start -= 1
        m = pattern.match(text, start)
        if m is None or (accept is not None and not accept(m.group())):
            continue
        pieces += (text[done : m.start()], placeholder)
        done = m.end()
        hits += 1
    if not hits:
        return text, 0
    pieces.append(text[done:])
    return "".join(pieces), hits


def _redact_secrets(text: str) -> tuple[str, int]:
    hits = 0
    for needle, pattern in _SECRETS:
        if needle in text:
            text, n = pattern.subn(PLACEHOLDERS["secret"], text)
            hits += n
    return text, hits


# (kind, substitution) in the order they run
_STEPS: list[tuple[str, Callable[[str], tuple[str, int]]]] = [
    ("private_key", lambda t: _PRIVATE_KEY.subn(PLACEHOLDERS["private_key"], t) if "PRIVATE KEY--" in t else (t, 0)),
    ("secret", _redact_secrets),
    ("email", lambda t: _anchored_subn(t, _EMAIL_HINT, _EMAIL, _EMAIL_LOCAL, 64, PLACEHOLDERS["email"])),
    ("ipv6", lambda t: _anchored_subn(t, _IPV6_HINT, _IPV6, _HEX_COLON, 45, PLACEHOLDERS["ipv6"], is_ipv6)),
    ("ipv4", lambda t: _anchored_subn(t, _IPV4_HINT, _IPV4, frozenset("0123456789"), 3, PLACEHOLDERS["ipv4"])),
]


def redact(text: str) -> tuple[str, dict[str, int]]:
    """Replace every email, IP address, secret and private-key block in `text` with its placeholder
    (PLACEHOLDERS). Returns the new text and the number of replacements per kind, listing only kinds found."""
    counts: dict[str, int] = {}
    for kind, substitute in _STEPS:
        text, n = substitute(text)
        if n:
            counts[kind] = n
    return text, counts
