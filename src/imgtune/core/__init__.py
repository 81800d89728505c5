"""The bottom layer: errors, files (atomic writes, JSON lines, the cache folder), progress display and machine
resources. It imports nothing else of imgtune, so every other package may use it."""
