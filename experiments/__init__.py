"""Experiment entry points (`train`, `evaluate`) and their configs (`configs/*.py`)."""
