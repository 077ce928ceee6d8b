"""From image bytes to a 48×48 face, in plain Python (no Dagster): decoding and validation
(:mod:`.preprocess`), face detection and eye alignment for photos (:mod:`.detect`, with the
vendored MTCNN under :mod:`._vendor`), perceptual hashes (:mod:`.phash`), the content-addressed
face store (:mod:`.store`) and a source's key in it (:mod:`.framing`), the worker side of the
faces stage (:mod:`.batch`) and the stage itself (:mod:`.stage`). ``ml`` prediction reuses the same functions, so a face is prepared the
same way for training and for classification.

May import: the contracts and :mod:`fer_pipeline.sources`. Deliberately empty of imports: face
workers import :mod:`.batch` alone and must start fast.
"""
