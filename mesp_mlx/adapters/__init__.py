"""Adapters in and out: LoRA layers and files in mlx-lm's format (lora.py), PEFT conversion both ways (convert.py),
folding into the base model (fuse.py)."""
