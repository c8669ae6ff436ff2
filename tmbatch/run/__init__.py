"""One `tmbatch run`: its config (one frozen RunConfig), the output directory, a line's attempts,
the runner, progress, the summary (and summary.json's typed values, `summaries`).

May import every part below it (`limits` and down); `tools`, `cli` and `sim` sit above it.
"""
