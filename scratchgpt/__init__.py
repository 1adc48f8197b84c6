"""The scratchgpt command line: a thin layer over core, training and app."""
