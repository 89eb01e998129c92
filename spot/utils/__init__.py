"""Helpers every layer may use: atomic files, plain records, one-line messages, figures, live metrics, the environment."""
