"""What every part may use: exit codes, stop reasons, logs, redaction, message words, file helpers,
TOML checks, credentials, the link to a fleet's Redis.

Imports nothing else of tmbatch.
"""
