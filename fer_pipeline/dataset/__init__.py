"""The dataset itself, in plain Python (no Dagster): the manifest (one row per kept image, one
excluded row per file not kept, with the reason), the train/validation/test splits with their
folds, and the pretraining pool with its leakage guard.

May import: the contracts (``classes``, ``paths``, ``schema``, ``atomic``), :mod:`fer_pipeline.sources`,
:mod:`fer_pipeline.faces` and :mod:`fer_pipeline.dedup`. Never Dagster, never ``ml`` or above.
"""
