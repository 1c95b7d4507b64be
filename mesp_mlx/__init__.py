"""mesp_mlx: memory-efficient LoRA fine-tuning on MLX (MeSP, MeBP, MeZO, LCSB) within phone-sized budgets."""

__version__ = "0.1.0"
