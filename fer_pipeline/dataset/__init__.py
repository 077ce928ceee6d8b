"""The data half, in plain Python (no Dagster), one module per stage of the graph:

catalogue (:mod:`.catalog`, :mod:`.source_readers`, :mod:`.demographics`) → inventory
(:mod:`.inventory`) → faces (:mod:`.preprocess`, :mod:`.face_batch`, :mod:`.faces`,
:mod:`.face_store`, :mod:`.phash`; detection and alignment for photos: :mod:`.detect`,
:mod:`.mtcnn`) → de-duplication (:mod:`.dedup`) → manifest
(:mod:`.manifest`) → splits (:mod:`.splits`), with the data checks (:mod:`.validation`), the
plots (:mod:`.plots`), the demo-data generator (:mod:`.synthetic_faces`) and the sensor's
fingerprints (:mod:`.source_watch`).

Deliberately empty of imports: face workers import :mod:`.face_batch` alone and must start fast.
"""
