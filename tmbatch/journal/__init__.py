"""The checkpoint: the journal, the one writer of the output files, typed outcome records, compact
per-line state.

May import `base` and `policy`.
"""
