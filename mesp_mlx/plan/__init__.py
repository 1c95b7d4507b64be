"""Will it fit, and how fast: the memory prediction by component (memory.py), the speed levers (speed.py), LCSB
advice (lcsb_advice.py), device profiles and the budget's enforcement (governor.py), and the plan a run executes
(resolve.py)."""
