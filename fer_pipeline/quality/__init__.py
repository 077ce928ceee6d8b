"""Data quality, in plain Python (no Dagster): the Great Expectations (GX Core 1.x) validations
the asset checks run (:mod:`.validation`) and the plots of the processed dataset (:mod:`.plots`).

May import: the contracts, :mod:`fer_pipeline.sources`, :mod:`fer_pipeline.faces`,
:mod:`fer_pipeline.dedup` and :mod:`fer_pipeline.dataset`.
"""
