"""What goes in: the input file (opened, fingerprinted), the routes a line may name, line
numbering and shards, lines read as requests, labelling templates.

May import `base`, `policy` and `journal`.
"""
