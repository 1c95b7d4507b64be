"""--max-seq-length follows the model by default (the smaller of 2048 and its context); only an explicit longer value
is refused."""

import pytest

from mesp_mlx.run.config import ConfigError, TrainConfig
from mesp_mlx.models.synthetic import model_config, write_random_model
from mesp_mlx.run.prepare import prepare_model


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    cfg = model_config("llama", 64, 1, 128, 4, 2, 384)
    cfg["max_position_embeddings"] = 512
    return write_random_model(tmp_path_factory.mktemp("ctx512") / "m", cfg, bits=4, group_size=32)


def test_default_follows_the_model_context(short_context_model):
    cfg = TrainConfig(model=str(short_context_model), data="unused")
    assert cfg.max_seq_length is None
    cfg.validate()
    assert prepare_model(cfg).settings.max_seq_length == 512
    assert cfg.max_seq_length is None  # resolved into the prepared settings, the user's config untouched


def test_explicit_value_over_the_context_is_refused(short_context_model):
    prepare_model(TrainConfig(model=str(short_context_model), max_seq_length=512))  # exactly the context: fine
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        prepare_model(TrainConfig(model=str(short_context_model), max_seq_length=1024))


def test_default_is_2048_for_long_context_models(tiny_models):
    cfg = TrainConfig(model=str(tiny_models["qwen2"]))
    assert prepare_model(cfg).settings.max_seq_length == 2048
    assert cfg.max_seq_length is None
