"""A frozen copy of the single-pair runtime as it was on main at ddb77f6 (issue 21 phase two's baseline).

``tests/test_frozen_pair.py`` runs it beside the live runtime in one process and requires every single-pair
output, decision and score to be bitwise the same on the reference path in float32 on CPU. Do not edit these
files except to keep them importable: they are the "before" of a refactor, not code under development.
"""
