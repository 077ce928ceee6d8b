"""The project's four target classes, in the fixed order every model and report uses."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("Neutral", "Focused", "Tired", "Angry")
CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

CLASS_DESCRIPTIONS: dict[str, str] = {
    "Neutral": "relaxed face",
    "Focused": "active concentration, attentive eyes",
    "Tired": "weariness, droopy eyes, vacant stare",
    "Angry": "tightened muscles, tight-lipped frown, narrowed eyes",
}
