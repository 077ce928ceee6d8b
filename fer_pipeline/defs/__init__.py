"""All Dagster wiring: resources (:mod:`.resources`), assets (:mod:`.assets`), data checks
(:mod:`.checks`), sensor and schedule (:mod:`.automation`), and the code location
(:mod:`.definitions`). Each asset reads its inputs, calls one function of
:mod:`fer_pipeline.dataset`, :mod:`fer_pipeline.ml` or :mod:`fer_pipeline.analysis`, writes
through one helper and reports metadata."""
