"""One training run as a recipe: config (config.py, checks.py) -> prepare (model, data, plan) -> session (engine,
resume) -> loop (the steps) -> finish (save, report); train.py reads it top-down."""
