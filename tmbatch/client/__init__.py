"""The wire: one HTTP attempt classified by the policy, SSE aggregation, preflight, what the server
serves.

May import `base`, `policy`, `journal` and `inputs`.
"""
