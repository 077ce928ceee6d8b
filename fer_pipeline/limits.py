"""Limits every reader of untrusted bytes shares (contracts: no imports): a file, an archive
entry or an image given to ``predict`` is never read past :data:`MAX_FILE_BYTES`, and streamed
reads hold :data:`READ_CHUNK` bytes at a time."""

MAX_FILE_BYTES = 64 * 1024 * 1024
"""The size cap of one input file (the ``fer`` resource's ``max_file_bytes`` default, ``predict
--max-bytes``): no face image is this large, and memory stays bounded on decompression bombs."""
READ_CHUNK = 1 << 20
"""Streaming reads (hashing): memory per read, not per file."""
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
"""The file bytes a stage that reads many files holds at once (the ``fer`` resource's
``max_bytes_in_flight`` default): read-ahead is bounded by bytes, not by a count of files, so
memory does not grow with file sizes. A single larger file still proceeds, alone. 64 MiB keeps
two workers fed with 2 MB photos (about 30 queued) and the stage's peak within 1.3x of what
small files need (benchmarks/bench_faces_memory.py)."""
