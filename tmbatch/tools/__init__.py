"""Commands that work on an output directory: status, resend, export, merge, report, labels.

May import `run` and everything below it.
"""
