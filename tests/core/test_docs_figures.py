"""The delays the docs promise are the ones the code uses.

Each row quotes a sentence of the docs that states a figure and names the constant it
states: changing either one alone fails here, so the docs cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from idemtask import guard, lease

DOCS = Path(__file__).resolve().parents[2] / "docs"

#: (page, the quoted words, the constant in seconds); the quote's first figure is checked.
FIGURES: list[tuple[str, str, float]] = [
    ("configuration.md", "50 ms the first time", guard.MIN_BUSY_DELAY),
    ("configuration.md", "at most 0.25 s and never past the holder", guard.MAX_BUSY_DELAY),
    ("configuration.md", "puts the message back for 5 seconds", guard.STORE_RETRY_DELAY),
    ("guarantees.md", "a busy copy looks again within 0.25 s", guard.MAX_BUSY_DELAY),
    ("architecture.md", "50 ms after its first look", guard.MIN_BUSY_DELAY),
    ("architecture.md", "doubling with each look after, at most 0.25 s", guard.MAX_BUSY_DELAY),
    ("architecture.md", "result within 0.25 s of its end", guard.MAX_BUSY_DELAY),
    ("architecture.md", "doubling from 50 ms", lease.FIRST_RETRY),
    ("architecture.md", "at most 2 s\nand a sixth", lease.MAX_RETRY),
    ("celery.md", "The countdown is 50 ms", guard.MIN_BUSY_DELAY),
    ("celery.md", "up to 0.25 s and never past", guard.MAX_BUSY_DELAY),
    ("celery.md", "published again after 5 s", guard.STORE_RETRY_DELAY),
    ("celery.md", "its next look, up to 0.25 s later", guard.MAX_BUSY_DELAY),
    ("dramatiq.md", "The delay is 50 ms", guard.MIN_BUSY_DELAY),
    ("dramatiq.md", "up to 0.25 s and never past", guard.MAX_BUSY_DELAY),
    ("cli.md", "0.25 s, and never past the holder", guard.MAX_BUSY_DELAY),
]

#: Pages that say how often a waiting copy asks the store, in words.
LOOKS_PER_SECOND = ["configuration.md", "celery.md", "dramatiq.md", "architecture.md"]

_FIGURE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|seconds)\b")
_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 10: "ten"}


def _text(page: str) -> str:
    return " ".join((DOCS / page).read_text().split())


@pytest.mark.parametrize(("page", "quote", "seconds"), FIGURES)
def test_a_delay_the_docs_state_is_the_one_the_code_uses(
    page: str, quote: str, seconds: float
) -> None:
    words = " ".join(quote.split())
    assert words in _text(page), f"{page} no longer says {words!r}: update this table"
    figure = _FIGURE.search(words)
    assert figure is not None, f"no figure in {words!r}"
    number, unit = float(figure.group(1)), figure.group(2)
    stated = number / 1000 if unit == "ms" else number
    assert stated == pytest.approx(seconds), f"{page} says {words!r}; the code uses {seconds} s"


@pytest.mark.parametrize("page", LOOKS_PER_SECOND)
def test_the_looks_per_second_the_docs_state_follow_from_the_longest_delay(page: str) -> None:
    looks = round(1 / guard.MAX_BUSY_DELAY)
    assert f"{_WORDS[looks]} times a second" in _text(page) or (
        f"{_WORDS[looks]} looks a second" in _text(page)
    ), f"{page} should say a waiting copy asks at most {looks} times a second"
