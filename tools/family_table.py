"""Regenerate the support table: sweep every module of mlx_lm.models (mesp_mlx/support/sweep.py) and write
mesp_mlx/models/families/support.json (read at run time: what `train` accepts or refuses, with the reason) and
docs/model_families.md (linked from the README). tests/test_family_table.py fails when a family listed as supported
stops matching mlx-lm, or when the two files disagree.

    PYTHONPATH=. python tools/family_table.py            # the whole sweep (about a minute)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesp_mlx.models.families import TABLE_FILE  # noqa: E402
from mesp_mlx.support.sweep import sweep  # noqa: E402
from mesp_mlx.support.table import render  # noqa: E402

DOC = ROOT / "docs" / "model_families.md"


def main() -> int:
    import mlx_lm

    table = sweep(verbose=True)
    TABLE_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(table, mlx_lm.__version__))
    counts = {t: sum(r["tier"] == t for r in table.values()) for t in ("hand", "generic", "refused")}
    print(f"{len(table)} modules: {counts}; wrote {TABLE_FILE} and {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
