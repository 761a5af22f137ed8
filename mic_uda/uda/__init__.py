"""Task-agnostic UDA ingredients: EMA teacher, masking, mixing, pseudo-labels, augmentation, BN policy.

Pure tensor functions with explicit generators, so every task (seg, cls, det) reuses them and the
maths can be unit-tested exactly.
"""
