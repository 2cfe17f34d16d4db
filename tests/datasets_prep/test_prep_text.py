from __future__ import annotations

import pytest

from datasets_prep.text import clean_title, decode_text_bytes, mmbt_clean


def test_mmbt_clean():
    raw = "Best <b>Apple-Pie</b> recipe!!\n\nWith (extra) 'quotes' & more_stuff... 50% {ok} [x] a/b\\c `t` ~#@^*$=+;:,"
    assert mmbt_clean(raw) == "best b apple pie b recipe with extra quotes more stuff 50 ok x a b c t"
    assert mmbt_clean("  MIXED\tCase\r\n") == "mixed case"
    assert "?" in mmbt_clean("why?")  # not in MMBT's list: kept


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ('[["Coleen\'s Recipes: BEST APPLE PIE EVER !!!"]]', "Coleen's Recipes: BEST APPLE PIE EVER !!!"),
        ("[[\"The Food Lab's Apple Pie", "The Food Lab's Apple Pie"),  # truncated list
        ('[["Joey Harrington\'s Baby Back Ribs"]', "Joey Harrington's Baby Back Ribs"),
        ("[]", ""),
        ("[Kosher] Honey Cake", "[Kosher] Honey Cake"),  # a real bracket, not a list
        ("Jos\\xc3\\xa9 Pizarro recipe: apple pie  - Telegraph", "José Pizarro recipe: apple pie - Telegraph"),
        ("Candy Apple Pie \\xe2\\x84\\xa2", "Candy Apple Pie ™"),
        (
            "Mini Apple Pie Bits &amp; Dip | Bob&#039;s Red Mill &raquo;",
            "Mini Apple Pie Bits & Dip | Bob's Red Mill »",
        ),
        ("  Crème Brûlée  ", "Crème Brûlée"),
        ("O", "O"),
    ],
)
def test_clean_title(raw, want):
    assert clean_title(raw) == want


def test_decode_text_bytes():
    assert decode_text_bytes("café".encode()) == "café"
    assert decode_text_bytes("\ufeffabc".encode()) == "abc"
    assert decode_text_bytes("café".encode("cp1252")) == "café"
    assert decode_text_bytes(b"\x81\x8d") == "\x81\x8d"  # undefined in cp1252: latin-1 never fails
