"""What every part may use: exit codes, stop reasons, logs, redaction, message words, file helpers,
TOML checks, credentials.

Imports nothing else of tmbatch.
"""
