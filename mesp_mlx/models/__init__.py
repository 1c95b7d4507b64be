from .compute import cast_float_params, set_compute_path
from .load import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model, resolve_model
from .parts import ModelParts, UnsupportedModel
