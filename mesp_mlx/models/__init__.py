from .compute import cast_float_params, set_compute_path
from .families import UnsupportedFamily, describe, family_lora_parameters
from .load import DEFAULT_MODEL, LoadedModel, ModelLoadError, context_length, load_model, resolve_model
from .parts import ModelParts, UnsupportedModel
