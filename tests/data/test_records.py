"""Option letters: one mapping between letters and options for prompts, loaders and records."""
import pytest

from data import VQARecord
from data.prompts import format_options
from data.records import letter_index, lettered


def test_lettered_and_letter_index_are_inverse():
    options = ["small nuclei", "large nuclei", "no nuclei"]
    assert lettered(options) == [("A", "small nuclei"), ("B", "large nuclei"), ("C", "no nuclei")]
    assert [letter_index(letter, len(options)) for letter, _ in lettered(options)] == [0, 1, 2]
    assert format_options(options) == "A. small nuclei\nB. large nuclei\nC. no nuclei\n"
    assert format_options(None) == "" and lettered([]) == []


@pytest.mark.parametrize("letter", ["D", "a", "AB", "", "Z"])
def test_letter_index_names_no_option(letter):
    assert letter_index(letter, 3) is None


def test_answer_letter_matches_text_after_normalizing():
    record = VQARecord(id="r", images=[], question="q", options=["x", "Large  Nuclei"],
                       answer="large nuclei")
    assert record.answer_letter == "B"
    assert VQARecord(id="o", images=[], question="q", answer="yes").answer_letter is None
