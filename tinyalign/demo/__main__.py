"""python -m tinyalign.demo [OUT]: the shapes world in two of the benchmarks' exact formats (POPE's
JSON lines, an MMBench TSV) and held-out preference pairs, for eval.py (default OUT: runs/demo-bench)."""

import sys

from .world import make_benchmarks

out = sys.argv[1] if len(sys.argv) > 1 else "runs/demo-bench"
written = make_benchmarks(out)
print("written:", ", ".join(str(p) for p in written.values()))
