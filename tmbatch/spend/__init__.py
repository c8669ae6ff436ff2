"""What a job costs: token estimates, prices, usage, the budget guard, `estimate`.

May import `base`, `policy`, `journal`, `inputs` and `client`.
"""
