"""Question phrasing shared by the procedural tiles, the OOD cartoons and the real assets."""
from __future__ import annotations

from typing import Callable

from ..records import lettered

MODALITY_QUESTION = "What imaging modality produced this image?"


def exclusions(options: list[str], answer: str, why: Callable[[str], str]) -> list[str]:
    """One criterion per wrong option, in letter order:
    ``"option B (<text>) is excluded because <why(text)>"``."""
    return [f"option {letter} ({option}) is excluded because {why(option)}"
            for letter, option in lettered(options) if option != answer]
