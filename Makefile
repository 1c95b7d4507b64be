# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: setup demo test bench personalize-demo docs-figures

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

# The docs' generated figures: `make docs-figures` rewrites them from docs/figures/ (no measuring);
# MEASURE=cheap | all | a comma list (tools/docs_figures.py --list) measures those first.
docs-figures: setup
	.venv/bin/python tools/docs_figures.py --measure "$(MEASURE)"
