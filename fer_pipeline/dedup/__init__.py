"""De-duplication, in plain Python (no Dagster): exact and near-duplicate groups of faces by
perceptual hash (band join, mirrored copies), confirmed by pixel correlation, one
representative per group, label conflicts flagged (:mod:`.groups`).

May import: the contracts and :mod:`fer_pipeline.faces`.
"""
