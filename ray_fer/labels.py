"""The seven expression classes and their order: the single source of truth.

Class index i means CLASSES[i] everywhere: in training labels, model outputs, Parquet columns.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
NUM_CLASSES = len(CLASSES)

# Parquet column holding the probability of each class, in class order.
PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{name}" for name in CLASSES)


def class_index(folder_name: str) -> int:
    """Index of the class a folder name stands for, matched case-insensitively.

    Raises ValueError naming the valid classes when the name is not one of them.
    """
    key = folder_name.strip().lower()
    try:
        return CLASSES.index(key)
    except ValueError:
        raise ValueError(
            f"unknown expression class {folder_name!r}; expected one of: {', '.join(CLASSES)}"
        ) from None
