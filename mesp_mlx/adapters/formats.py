"""Which adapter a folder holds, mlx-lm's or PEFT's, so that no command writes one format over the other.

Both formats name their config `adapter_config.json`: writing an mlx-lm adapter into a PEFT folder (or the reverse)
would replace the other's config and leave a folder that neither mlx-lm nor PEFT loads. Every command that writes
adapters into a folder asks `refuse_foreign` first.
"""

from __future__ import annotations

import json
from pathlib import Path

MLX_WEIGHTS, PEFT_WEIGHTS, CONFIG = "adapters.safetensors", "adapter_model.safetensors", "adapter_config.json"


class ForeignAdapter(ValueError):
    """The folder holds an adapter of the other format."""


def folder_format(folder: str | Path) -> str | None:
    """"mlx-lm", "peft", or None (no adapter there, or a config that says neither)."""
    folder = Path(folder)
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx-lm"
    if (folder / PEFT_WEIGHTS).is_file() or (folder / "adapter_model.bin").is_file():
        return "peft"
    try:
        config = json.loads((folder / CONFIG).read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    if "peft_type" in config or "target_modules" in config:
        return "peft"
    if "lora_parameters" in config or "fine_tune_type" in config:
        return "mlx-lm"
    return None


def refuse_foreign(folder: str | Path, writes: str, flag: str) -> None:
    """ForeignAdapter when `folder` holds an adapter of another format than the `writes` one this command writes."""
    found = folder_format(folder)
    if found is not None and found != writes:
        how = "--to mlx-lm" if found == "peft" else "--to peft"
        raise ForeignAdapter(f"{flag} {folder} holds a {found} adapter; writing a {writes} adapter there would replace "
                             f"its {CONFIG}: choose another folder (or convert it first: mesp-mlx convert {folder} "
                             f"<new folder> {how})")
