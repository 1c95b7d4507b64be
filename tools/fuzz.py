"""The property-based tests of tests/test_properties.py and tests/test_cli_arguments.py, run long: every reader of
user-supplied bytes (data jsonl, YAML / flag configuration, mlx-lm / PEFT adapters, GGUF, the personalization stream)
against many generated and mutated inputs, and every command's parser against generated arguments. The default suite
runs the same properties with 40 examples each (the argument fuzz fewer for its costly commands: train, plan,
personalize, make-data, federate); this runs --examples each (2000 by default, a quarter to an eighth of it for those
commands) with fresh random draws every time.

    .venv/bin/python tools/fuzz.py                 # 2000 examples per property
    .venv/bin/python tools/fuzz.py --examples 20000 -k gguf
    .venv/bin/python tools/fuzz.py -k arguments    # only the argument fuzz
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2000, help="examples per property")
    p.add_argument("-k", help="only the properties whose name matches (pytest -k)")
    args = p.parse_args()
    env = {**os.environ, "HYPOTHESIS_PROFILE": "long", "MESP_MLX_FUZZ_EXAMPLES": str(args.examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_properties.py"),
           str(ROOT / "tests" / "test_cli_arguments.py") + "::test_generated_arguments_end_in_a_status_never_a_traceback"]
    if args.k:
        cmd += ["-k", args.k]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
