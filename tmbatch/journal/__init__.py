"""The checkpoint: the journal's format (its records as types, the one decoder and reader), the
journal's replay, the one writer of the output files, typed outcome records, compact per-line
state.

May import `base` and `policy`.
"""
