"""Where images come from, in plain Python (no Dagster): the catalogue (``sources.yaml``) and its
framing vocabulary (:mod:`.framing`), the readers of a folder, a .zip archive or a FER2013 CSV
(with every filesystem and archive safety rule), the inventory of every file, demographics
sheets, and the stat-only fingerprints the sources sensor compares.

May import: the contracts (``classes``, ``paths``, ``schema``, ``atomic``). Nothing above.
"""
