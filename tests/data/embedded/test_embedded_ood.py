"""Procedural OOD cartoons: seeded per item, questions and criteria exact by construction."""
import numpy as np
import pytest

from data.embedded.ood import FINDINGS, OOD_MODALITIES, generate_ood_item


@pytest.mark.parametrize("modality", OOD_MODALITIES)
def test_items_are_seeded_and_labelled_by_construction(modality):
    letters = []
    for index in range(12):
        image, item, truth = generate_ood_item(modality, 42, index)
        again, same, _ = generate_ood_item(modality, 42, index)
        assert np.array_equal(np.asarray(image), np.asarray(again)) and item == same
        assert image.size == (112, 112) and item["answer"] in item["options"]
        question, options, _ = FINDINGS[modality]
        present = truth["finding_present"]
        assert present == (index % 2 == 1) and truth["task"] == "finding"
        assert item["question"] == question and item["answer"] == options[int(present)]
        # one checkable claim "<subject> is|are <value>, not <other>"
        (claim,) = item["criteria"]
        value, other = claim.split(" is " if " is " in claim else " are ")[1].split(", not ")
        assert value != other and {value, other} <= {"present", "absent", "symmetric", "asymmetric"}
        assert (value in ("present", "asymmetric")) == present
        letters.append("AB"[options.index(item["answer"])])
    # balanced answers, and no answer is constant within the set
    assert letters.count("A") == letters.count("B") == 6


@pytest.mark.parametrize("modality", OOD_MODALITIES)
def test_the_finding_changes_the_pixels(modality):
    """Same seed stream, finding absent vs present: the images differ (the answer is in the image)."""
    absent = np.asarray(generate_ood_item(modality, 42, 0)[0], np.float32)
    present = np.asarray(generate_ood_item(modality, 42, 1)[0], np.float32)
    assert absent.shape == present.shape and np.abs(absent - present).mean() > 1.0


def test_unknown_modality_is_named():
    with pytest.raises(ValueError, match="unknown OOD modality 'xray'"):
        generate_ood_item("xray", 42, 0)
