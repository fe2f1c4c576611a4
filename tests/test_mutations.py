"""Every format tinyalign reads, mutated one thing at a time (tests/mutations.py): no case may end in
an error that does not name the file. The table (`python tests/mutations.py`) is in docs/crash-safety.md."""

import mutations


def test_no_mutation_of_any_format_ends_in_an_error_that_does_not_name_the_file():
    results = mutations.run()
    formats = {r["format"] for r in results}
    assert len(formats) == len(mutations.all_formats()) >= 29 and len(results) > 2500
    unnamed = [f"{r['format']}: {r['case']}: {r['message']}" for r in results if r["outcome"] == "unnamed"]
    assert not unnamed, "\n".join(unnamed[:20])
    # every outcome occurs: the harness tells them apart (a reader that refused everything, or nothing, would show)
    assert {r["outcome"] for r in results} == {"named", "dropped", "accepted"}


def test_an_error_that_does_not_name_the_file_is_caught():
    """The harness itself: a reader failing with an unnamed error is reported as such."""
    def read(path):
        raise KeyError("id")

    fmt = mutations.Format("broken", lambda d: mutations.put(d, "x.jsonl", [{"id": 1}]), read, "jsonl")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = fmt.write(Path(tmp))
        assert mutations.outcome(fmt, path)[0] == "unnamed"
