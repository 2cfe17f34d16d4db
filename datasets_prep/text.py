"""Text cleaning helpers shared by the converters.

- :func:`mmbt_clean`: the MMBT/MoPE Food-101 cleaning (``scripts/food_101.py``): every ASCII punctuation character of
  MMBT's list becomes a space, whitespace runs collapse to one space, lower case, no newlines.
- :func:`clean_title`: undo the quirks of the UPMC Food-101 ``*_titles.csv`` titles (stringified ``[["..."]]`` lists,
  some truncated; literal ``\\xNN`` byte escapes; HTML entities) before any further cleaning.
- :func:`decode_text_bytes`: UTF-8 (with or without BOM), falling back to cp1252/latin-1 for scraped pages.
"""

from __future__ import annotations

import html
import re

__all__ = [
    "MMBT_PUNCTUATION",
    "clean_title",
    "decode_text_bytes",
    "decode_text_bytes_info",
    "mmbt_clean",
    "normalize_space",
]

# MMBT scripts/food_101.py: angle brackets, slashes, + = - _, brackets and braces, quotes, ; : . , parentheses,
# * & ^ % $ # @ ! ~ and the backtick.
MMBT_PUNCTUATION = "<>/\\+=-_[]{}'\";:.,()*&^%$#@!~`"
_MMBT_TABLE = str.maketrans(dict.fromkeys(MMBT_PUNCTUATION, " "))
_WS = re.compile(r"\s+")


def normalize_space(text: str) -> str:
    """Collapse every whitespace run (newlines included) to one space and strip."""
    return _WS.sub(" ", text).strip()


def mmbt_clean(text: str) -> str:
    """MMBT Food-101 text cleaning: punctuation of :data:`MMBT_PUNCTUATION` -> space, collapse whitespace, lower
    case."""
    return normalize_space(text.translate(_MMBT_TABLE)).lower()


_LIST_OPEN = re.compile(r"""^\[\s*\[?\s*(["'])""")
_LIST_CLOSE = re.compile(r"""(["'])\s*\]?\s*\]$""")
_BYTE_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")


def _decode_escapes(m: re.Match) -> str:
    raw = bytes.fromhex(m.group(0).replace("\\x", "").replace("\\X", ""))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def clean_title(title: str) -> str:
    """Clean one UPMC Food-101 title as found in ``texts/*_titles.csv`` (already CSV-unquoted).

    1. Unwrap a stringified list ``[["..."]]`` / ``["..."]`` (also when truncated: ``[["Baklava``); ``[]`` -> ``""``.
       Titles that merely start with ``[`` (``[Kosher] ...``) are left alone.
    2. Decode literal byte escapes (``\\xe2\\x80\\x93`` -> ``–``) as UTF-8 (cp1252 if that fails).
    3. Unescape HTML entities (``&amp;``, ``&#039;``, ``&raquo;`` ...).
    4. Collapse whitespace and strip.
    """
    s = title.strip()
    if s in ("[]", "[[]]"):
        return ""
    m = _LIST_OPEN.match(s)
    if m:
        s = s[m.end() :]
        c = _LIST_CLOSE.search(s)
        if c:
            s = s[: c.start()]
        # several list elements: '"a", "b"' -> 'a b'
        s = re.sub(r"""["']\s*\]?\s*,\s*\[?\s*["']""", " ", s)
    s = _BYTE_ESCAPES.sub(_decode_escapes, s)
    s = html.unescape(s)
    return normalize_space(s)


def decode_text_bytes(data: bytes) -> str:
    """Decode scraped text: UTF-8 (BOM stripped), else cp1252, else latin-1 (never fails)."""
    return decode_text_bytes_info(data)[0]


def decode_text_bytes_info(data: bytes) -> tuple[str, str]:
    """:func:`decode_text_bytes` and the encoding used (``utf-8``, ``cp1252`` or ``latin-1``), so that converters can
    count the texts that were not UTF-8 (manifest ``warnings``) instead of decoding them without a word."""
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(enc), "utf-8" if enc == "utf-8-sig" else enc
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"
