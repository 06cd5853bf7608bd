"""Procedural OOD cartoons: seeded per item, questions and criteria exact by construction."""
import numpy as np
import pytest

from data.embedded.ood import FINDINGS, MODALITY_OPTIONS, OOD_MODALITIES, generate_ood_item
from data.embedded.questions import MODALITY_QUESTION


@pytest.mark.parametrize("modality", OOD_MODALITIES)
def test_items_are_seeded_and_labelled_by_construction(modality):
    tasks = set()
    for index in range(12):
        image, item, truth = generate_ood_item(modality, 42, index)
        again, same, _ = generate_ood_item(modality, 42, index)
        assert np.array_equal(np.asarray(image), np.asarray(again)) and item == same
        assert image.size == (112, 112) and item["answer"] in item["options"]
        tasks.add(truth["task"])
        if truth["task"] == "modality":
            assert item["question"] == MODALITY_QUESTION and item["options"] == MODALITY_OPTIONS
            assert item["answer"] == MODALITY_OPTIONS[OOD_MODALITIES.index(modality)]
            continue
        question, options, facts = FINDINGS[modality]
        present = truth["finding_present"]
        wrong = 1 - int(present)
        assert item["answer"] == options[int(present)]
        assert item["criteria"] == [facts[int(present)],
                                    f"option {'AB'[wrong]} ({options[wrong]}) is excluded "
                                    f"because {facts[int(present)]}"]
    assert tasks == {"finding", "modality"}


def test_unknown_modality_is_named():
    with pytest.raises(ValueError, match="unknown OOD modality 'xray'"):
        generate_ood_item("xray", 42, 0)
