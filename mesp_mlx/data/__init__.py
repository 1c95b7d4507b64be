"""Training data: mlx-lm's jsonl formats, validated, and batched as mlx-lm does (datasets.py); real text from
installed packages turned into such folders (corpora.py)."""
