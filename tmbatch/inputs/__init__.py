"""What goes in: the input file read as requests, line numbering and shards, labelling templates.

May import `base`, `policy` and `journal`.
"""
