"""opcd: On-Policy Context Distillation of language models.

A student samples answers without a context; a frozen teacher scores the same tokens with it; the
student minimises a top-k reverse KL to the teacher. Entry point: `opcd distill` (opcd/cli.py).
"""

__version__ = "0.1.0"
