"""The ground layer: errors, paths, hashing, atomic writes, rung statuses and the one exit-code classifier.

Every other part of edgequant imports these; they import nothing of edgequant's (tests/test_layers.py checks).
"""
