# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: setup demo test bench personalize-demo

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/mesp-mlx make-data --out runs/demo_data --categories botprofile
	.venv/bin/mesp-mlx train -c recipes/smollm2_demo.yaml

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/python tools/bench.py

personalize-demo: setup
	.venv/bin/python tools/personalize_demo.py --seeds 0,1
