"""Explanation methods: plain callables on tensors (Grad-CAM, RELAX, Q-Score, FALCON, pairs, AGF, concepts)."""
