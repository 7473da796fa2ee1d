"""Dialogs that run one job each: importing the original's checkpoints, exporting to other formats."""
