"""What every other package uses: errors, processes, locks, atomic file operations, confined paths.

The lowest layer: nothing here imports from another ``imageupdate`` package (see ``.importlinter``).
"""
