"""Run `mlx_lm lora` (its own CLI parsing and training loop, unchanged) with a callback that prints each report as JSON
(mlx-lm prints peak memory and it/s only in its interactive UI). Usage: same arguments as `python -m mlx_lm lora`."""

import json
import sys

import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback


class JsonReports(TrainingCallback):
    def on_train_loss_report(self, info):
        print("MLX_LM_REPORT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    original = lora.get_reporting_callbacks

    def with_json(*a, **k):
        return JsonReports()

    lora.get_reporting_callbacks = with_json
    sys.argv[0] = "mlx_lm.lora"
    lora.main()
