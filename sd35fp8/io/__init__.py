"""Files: checkpoint inspection (header only: ``checkpoint``), and the memory-mapped reader, the atomic writer and
the hybrid FP8 layout with its metadata both ways (``files``)."""
