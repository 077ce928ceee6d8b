"""The review loop: what a person should look at (:mod:`~fer_pipeline.review.queue`) and the round
trip through Label Studio (:mod:`~fer_pipeline.review.label_studio`). The decisions come back as a
table the manifest applies (:func:`fer_pipeline.dataset.manifest.apply_reviews`).

Its room sits above ``dataset`` and ``ml`` (it reads the manifest's and the models' published
tables and the face store) and below the Dagster wiring; it imports no Dagster.
"""
