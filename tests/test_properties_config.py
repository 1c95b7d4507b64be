"""Property-based tests of the configuration surface (YAML files and flags): any input loads into a valid run or is
refused with one line (ConfigError: exit 2). Same Hypothesis profiles as tests/test_properties.py."""

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from test_properties import JSON_VALUES, inputs  # noqa: E402


# --- configuration: YAML and flags --------------------------------------------------------------------------------------
YAML_KEYS = ["learning_rate", "iters", "batch_size", "lora_parameters", "num_layers", "optimizer", "optimizer_config",
             "seed", "max_seq_length", "steps_per_eval", "val_batches", "save_every", "method", "lcsb_fraction",
             "zo_eps", "budget_mb", "device_profile", "grad_accumulation_steps", "lr_schedule", "fine_tune_type",
             "mask_prompt", "dtype", "vocab_chunk", "steps_per_report", "clear_cache", "unknown_key"]
VALID_YAML = (b"learning_rate: 1.0e-4\niters: 3\nbatch_size: 2\nlora_parameters:\n  rank: 4\n  scale: 20.0\n"
              b"  dropout: 0.0\noptimizer: adamw\n")


def _check_config(yaml_bytes: bytes, flags: dict):
    from mesp_mlx.run.config import ConfigError, build_config

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_bytes(yaml_bytes)
        try:
            cfg = build_config(str(path), {"data": d, **flags})
            cfg.validate()
        except ConfigError as e:
            assert "\n" not in str(e).strip(), e


@given(data=inputs(VALID_YAML))
def test_yaml_configs_of_any_bytes_load_or_are_refused(data):
    _check_config(data, {})


@given(values=st.dictionaries(st.sampled_from(YAML_KEYS), JSON_VALUES, min_size=1, max_size=4))
def test_yaml_configs_with_any_values_load_or_are_refused(values):
    import yaml

    try:
        text = yaml.safe_dump(values).encode()
    except yaml.YAMLError:  # a float('nan') key and the like: not a YAML anyone can write
        return
    _check_config(text, {})


@given(flags=st.lists(st.tuples(st.sampled_from(["--learning-rate", "--iters", "--batch-size", "--max-seq-length",
                                                  "--num-layers", "--lcsb-fraction", "--zo-eps", "--budget-mb",
                                                  "--save-every", "--val-batches", "--seed", "--optimizer",
                                                  "--device-profile", "--vocab-chunk", "--steps-per-eval"]),
                                st.one_of(st.sampled_from(["0", "-1", "1", "nan", "inf", "-inf", "1e-4", "3", "x", "",
                                                           "1e400", "adamw", "sgd"]), st.text(max_size=6))),
                      max_size=5))
def test_flags_with_any_values_parse_or_are_refused(flags):
    from mesp_mlx.cli import _ArgumentError, build_parser

    argv = ["train"] + [x for flag, value in flags for x in (flag, value)]
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as e:  # main() prints it as one line and exits 2
        assert "\n" not in str(e)
        return
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    _check_config(b"", overrides)
