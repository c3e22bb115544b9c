"""The answer matcher reads numbers as written: its labels feed calibrations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livepp.car.tasks import answer_matches, last_number


@pytest.mark.parametrize(
    "reply,number",
    [
        ("1,2,3", 3),  # a list, not one hundred and twenty-three
        ("3-4", 4),  # a range: the minus joins two numbers
        ("-5", -5),
        ("The answer is x = -5.", -5),
        ("1,234", 1234),
        ("1,234,567 apples", 1234567),
        ("12,34", 34),  # not a valid thousands group
        ("3 + 4 = 7.", 7),
        ("7.0", 7),
        ("5 - 3", 3),
        ("答案是7", 7),
        ("no digits here", None),
    ],
)
def test_last_number_reads_numbers_as_written(reply, number):
    assert last_number(reply) == number


def test_answers_match_with_the_written_number():
    assert not answer_matches("1,2,3", ["123"])
    assert answer_matches("1,2,3", ["3"])
    assert not answer_matches("3-4", ["-4"])
    assert answer_matches("3-4", ["4"])
    assert answer_matches("It is 1,234.", ["1234"])
    assert answer_matches("The capital of France is Paris.", ["Paris"])


@given(st.integers(min_value=-10**9, max_value=10**9))
def test_formatted_integers_round_trip(n):
    assert last_number(f"so the result is {n:,}") == n
    assert last_number(f"{n}") == n
