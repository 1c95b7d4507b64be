"""Which mlx-lm families train here: the sweep that checks each one on a tiny model against autodiff (sweep.py) and
the support table it writes (table.py). A tool over the engine, run by tools/family_table.py and the tests."""
