"""What a job costs: token estimates, prices, usage, the budget guard and each attempt's
reservation, `estimate`.

May import `base`, `policy`, `journal`, `inputs` and `client`.
"""
