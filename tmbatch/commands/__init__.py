"""One module per group of subcommands, each parser beside the function that runs it."""
