import os

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map

from mesp_mlx.models.synthetic import model_config, write_random_model

FAMILIES = {
    "qwen2": model_config("qwen2", 64, 3, 128, 4, 2, 384),
    "llama": model_config("llama", 64, 3, 160, 4, 2, 384),
    "qwen3": model_config("qwen3", 64, 3, 128, 4, 2, 384, head_dim=32),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the embedded-model import and quantize-on-load caches go to a temp home, except the real SmolLM2 import which
    # is reused across tests from MESP_MLX_TEST_HOME when set
    home = tmp_path_factory.mktemp("mesp_home")
    old = os.environ.get("MESP_MLX_HOME")
    os.environ["MESP_MLX_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("MESP_MLX_HOME", None)
    else:
        os.environ["MESP_MLX_HOME"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: folder} of tiny random 4-bit (group 32) models with fp32 scales."""
    root = tmp_path_factory.mktemp("models")
    return {name: write_random_model(root / name, cfg, bits=4, group_size=32, seed=i)
            for i, (name, cfg) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (embedded GGUF) imported to an MLX folder once per test session."""
    from mesp_mlx.models.gguf_import import import_gguf
    from mesp_mlx.models.load import embedded_gguf

    return import_gguf(embedded_gguf(), tmp_path_factory.mktemp("smol") / "SmolLM2")


def randomize_lora(model, seed=0, std=0.05):
    """LoRA B starts at zero; give every LoRA tensor random values so gradients of A are non-trivial."""
    mx.random.seed(seed)
    model.update(tree_map(lambda x: std * mx.random.normal(x.shape), model.trainable_parameters()))
    mx.eval(model.parameters())


def max_rel_err(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / (mx.abs(b).max() + 1e-30)).item()


def masked_ce(model, batch):
    logits = model(batch.inputs)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch.targets) * batch.mask
    return ce.sum() / batch.mask.sum()


def flat(tree) -> dict:
    return dict(tree_flatten(tree))


# Property-based tests (tests/test_properties.py): a bounded, reproducible profile for the default suite; the long one
# runs from tools/fuzz.py (HYPOTHESIS_PROFILE=long).
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=int(os.environ.get("MESP_MLX_FUZZ_EXAMPLES", 2000)), deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is in the test extras; without it only test_properties.py is skipped
    pass


def assert_same_adapter(ours, theirs, start, rel: float = 1e-3, moved_more_than: float = 1e-3) -> None:
    """Our adapters.safetensors equals `theirs` (mlx-lm's run) per tensor within `rel` (norm of the difference over
    theirs), and their run moved the adapter away from `start` by more than `moved_more_than` (so the comparison is
    not vacuous)."""
    a, b, s = (mx.load(str(p)) for p in (ours, theirs, start))
    assert set(a) == set(b)
    moved = 0.0
    for k in a:
        diff = (mx.linalg.norm(a[k] - b[k]) / mx.linalg.norm(b[k])).item()
        assert diff <= rel, (k, diff)
        moved = max(moved, (mx.linalg.norm(b[k] - s[k]) / mx.linalg.norm(s[k])).item())
    assert moved > moved_more_than, moved
