"""Offline training and export of character-level LSTM/GRU language models.

The only package in the project that imports TensorFlow (lazily, inside the
functions that need it, so `--help` and the pure helpers stay fast).
"""
