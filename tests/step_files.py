"""How many of the project's files one DPO step runs code from: the numbers docs/architecture.md gives.

    python tests/step_files.py              # plain rows (the demo's)
    python tests/step_files.py --packing    # packed rows (real runs' default)

A tiny run of train_dpo.py (a small shapes world, a random tiny checkpoint, three optimizer steps);
`sys.setprofile` records every project function entered during optimizer step 2, and the files they
live in: once for the whole optimizer step (the batch, the DPO computation, backward, AdamW, logging)
and once for the DPO computation alone (what `train_dpo.main` calls for one micro-batch's loss:
`dpo_step`). About a minute on 2 CPU cores; profiling makes it slow, not wrong.
"""

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import train_dpo  # noqa: E402
from conftest import make_tiny_world  # noqa: E402
from test_training import dpo_args, write_pairs  # noqa: E402
from tinyalign.infra.run import Run  # noqa: E402


def project_file(code) -> str | None:
    path = Path(code.co_filename).resolve()
    if not path.is_relative_to(REPO) or path.suffix != ".py" or not path.exists():
        return None
    relative = path.relative_to(REPO)
    return None if relative.parts[0] in ("tests", ".venv") else str(relative)


def main(argv=None):
    extra = sys.argv[1:] if argv is None else argv
    whole, computation = set(), set()
    state = {"on": False, "depth": 0}

    def profile(frame, event, arg):
        if not state["on"]:
            return
        if event == "call":
            caller = frame.f_back
            if (state["depth"] == 0 and frame.f_code.co_name == "dpo_step" and caller is not None
                    and caller.f_code.co_name == "main"):
                state["depth"] = 1
            elif state["depth"]:
                state["depth"] += 1
            name = project_file(frame.f_code)
            if name:
                whole.add(name)
                if state["depth"]:
                    computation.add(name)
        elif event == "return" and state["depth"]:
            state["depth"] -= 1

    after_step = Run.after_step

    def counting_after_step(self, step, *args, **kwargs):  # from the end of step 1 to the end of step 2
        done = after_step(self, step, *args, **kwargs)
        state["on"] = step == 1
        sys.setprofile(profile if step == 1 else None)
        return done

    Run.after_step = counting_after_step
    folder = Path(tempfile.mkdtemp())
    world = make_tiny_world(folder / "world")
    pairs = write_pairs(world, folder / "pairs.jsonl")
    train_dpo.main(dpo_args(world, pairs, folder / "run", "--max-steps", "3", "--grad-accum", "1", *extra))
    counts = {}
    for what, files in (("the DPO computation (dpo_step)", computation), ("one whole optimizer step", whole)):
        counts[what] = {"files": len(files), "lines": sum(len((REPO / f).read_text().splitlines()) for f in files),
                        "which": sorted(files)}
    print(json.dumps(counts, indent=1))
    return counts


if __name__ == "__main__":
    main()
