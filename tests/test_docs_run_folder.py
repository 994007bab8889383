"""docs/run-folder.md stays true to the code: every metrics.jsonl record kind and field, every
summary.json and config.json field, that real runs write is documented there, and every record
kind it documents is one the code writes; every file its table says a run writes is in a real
run's folder, and every file there is in the table.

The doc lists each record kind under a heading ``#### `kind` ...`` in its "metrics.jsonl"
section, with its fields in the first column of a table (`` | `field` | ``); summary.json's and
config.json's fields are in their own sections the same way.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "run-folder.md"
SOURCES = ["cnn_core", "server", "worker", "pscnn"]
COMMON = {"kind", "seconds"}        # every record's, documented once for all
SMALL = ["--model", "light", "--train-limit", "640", "--test-limit", "200", "--batch-size", "64",
         "--no-progress", "--threads", "1"]

# A table row's first cell, a name in backticks: | `compute_s` | ...
ROW_NAME = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.M)


def sections(text: str, level: int) -> dict[str, str]:
    """Heading text -> the text under it (up to the next heading of ``level`` or above)."""
    parts = re.split(rf"^(#{{1,{level}}} .*)$", text, flags=re.M)
    return {parts[i].lstrip("#").strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def documented_kinds(text: str = None) -> dict[str, set]:
    """Record kind -> the fields its doc tables list (a kind written by both commands has two
    headings, "`start` (pscnn train)" and "`start` (server)": their fields are merged)."""
    text = DOC.read_text() if text is None else text
    metrics = sections(text, 2)["metrics.jsonl"]
    kinds: dict[str, set] = {}
    for heading, body in sections(metrics, 4).items():
        m = re.match(r"`(\w+)`", heading)
        if m and heading.count("`") == 2:       # "#### `step` (server)", not "### The clock: `seconds`"
            kinds.setdefault(m.group(1), set()).update(ROW_NAME.findall(body))
    return kinds


def section_names(title: str, text: str = None) -> set:
    """The names in the first column of the tables of the section ``## title``."""
    text = DOC.read_text() if text is None else text
    return set(ROW_NAME.findall(sections(text, 2)[title]))


def documented_files(text: str = None) -> dict[str, tuple[str, str]]:
    """File name -> its (``pscnn train``, distributed) cells in "The files" table: a row
    `` | `a.png`, `b.png` | yes | yes | ... `` gives both names; cells read "yes", "no" or which
    command writes it ("`pscnn run` only")."""
    text = DOC.read_text() if text is None else text
    files = {}
    for row in re.findall(r"^\|(.*)\|\s*$", sections(text, 2)["The files"], re.M):
        cells = [cell.strip() for cell in row.split("|")]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            files[name] = (cells[1], cells[2])
    return files


# summary.json's section lists its fields in three tables, each under a line naming who writes them.
SUMMARY_WRITERS = {"Fields of both commands:": "both", "Fields only `pscnn train` writes:": "train",
                   "Fields only distributed runs write:": "distributed"}


def summary_fields(text: str = None) -> dict[str, set]:
    """summary.json's documented fields by who writes them: "both", "train" and "distributed"."""
    text = DOC.read_text() if text is None else text
    parts = re.split(r"^(Fields [^\n]*:)$", sections(text, 2)["summary.json"], flags=re.M)
    return {SUMMARY_WRITERS[parts[i]]: set(ROW_NAME.findall(parts[i + 1])) for i in range(1, len(parts) - 1, 2)}


def kinds_in_source() -> set:
    """Every kind passed to RunWriter.log / log_deferred in the package's source."""
    call = re.compile(r"\.log(?:_deferred)?\(\s*\"(\w+)\"")
    found = set()
    for package in SOURCES:
        for path in (REPO / package).rglob("*.py"):
            found.update(call.findall(path.read_text()))
    return found


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pscnn(*args, expect: int = 0, timeout: float = 120) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSCNN_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "pscnn.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------ the doc against the source
def test_the_doc_lists_exactly_the_record_kinds_the_code_writes():
    source = kinds_in_source()
    # the search itself works: kinds of both writers, one of them written with log_deferred
    assert {"start", "step", "epoch", "eval", "checkpoint"} <= source, source
    doc = documented_kinds()
    assert set(doc) == source, (f"documented but never written: {sorted(set(doc) - source)}; "
                                f"written but not documented: {sorted(source - set(doc))}")
    assert all(doc.values()), {k: v for k, v in doc.items() if not v}
    assert all(f"`{name}`" in sections(DOC.read_text(), 2)["metrics.jsonl"] for name in COMMON)


def test_the_parser_sees_a_field_removed_from_the_doc():
    """What the run test relies on: a field taken out of a kind's table is no longer documented."""
    text = DOC.read_text()
    assert "compute_s" in documented_kinds(text)["step"]
    cut = re.sub(r"^\| `compute_s` \|.*\n", "", text, flags=re.M)
    assert cut != text and "compute_s" not in documented_kinds(cut)["step"]


def test_the_parser_reads_the_files_table():
    """What the run folder test relies on: the table's rows, both names of a shared row, and the
    cells that say which command writes a file."""
    files = documented_files()
    assert files["checkpoint.npz"] == ("no", "yes"), files
    assert files["learning_curves.png"] == files["confusion_matrix.png"] == ("yes", "yes"), files
    assert files["logs/<name>.log"][1] == "`pscnn run` only", files


def test_the_parser_reads_who_writes_each_summary_field():
    """What the summary test relies on: the three tables, each field under its writers."""
    fields = summary_fields()
    assert set(fields) == {"both", "train", "distributed"}, fields
    assert {"status", "test_accuracy"} <= fields["both"] and "threads" in fields["train"], fields
    assert "mode" in fields["distributed"] and not (fields["both"] & (fields["train"] | fields["distributed"]))


# ------------------------------------------------------------------ the doc against real runs
@pytest.fixture(scope="module")
def run_folders(tmp_path_factory, request) -> dict[str, Path]:
    """A distributed run (sync, evaluator), a distributed run that diverges (no evaluator: the
    server scores the final weights), a pscnn train run and one that diverges."""
    mnist_dir = request.getfixturevalue("mnist_dir")
    base = tmp_path_factory.mktemp("runs")
    runs = {name: base / name for name in ("run", "run-diverged", "train", "train-diverged")}
    data = ["--mnist-dir", mnist_dir]
    pscnn("run", "--workers", "2", "--epochs", "1", "--eval-every", "1", *SMALL, *data, "--out", runs["run"])
    pscnn("run", "--workers", "2", "--epochs", "1", "--no-evaluator", "--optimizer", "sgd", "--lr", "1e9",
          "--schedule", "constant", *SMALL, *data, "--out", runs["run-diverged"], expect=1)
    pscnn("train", "--epochs", "2", "--log-every", "4", *SMALL, *data, "--out", runs["train"])
    pscnn("train", "--epochs", "1", "--optimizer", "sgd", "--lr", "1e9", "--schedule", "constant", "--log-every", "2",
          *SMALL, *data, "--out", runs["train-diverged"], expect=1)
    return runs


@pytest.mark.slow
def test_every_record_kind_and_field_written_is_documented(run_folders):
    doc = documented_kinds()
    written: dict[str, set] = {}
    for folder in run_folders.values():
        for record in read_jsonl(folder / "metrics.jsonl"):
            written.setdefault(record["kind"], set()).update(record)
    # the runs show what they are meant to: both writers' records, a divergence of each
    expected = {"start", "join", "started", "step", "eval", "checkpoint", "failed", "epoch", "diverged"}
    assert expected <= set(written), sorted(set(written))
    undocumented = {kind: sorted(fields - COMMON - doc.get(kind, set())) for kind, fields in written.items()}
    undocumented = {kind: fields for kind, fields in undocumented.items() if fields or kind not in doc}
    assert not undocumented, f"in metrics.jsonl, not in {DOC.name} (kind: fields): {undocumented}"


@pytest.mark.slow
def test_every_summary_and_config_field_written_is_documented(run_folders):
    summary_doc, config_doc = section_names("summary.json"), section_names("config.json")
    missing = {}
    for name, folder in run_folders.items():
        summary = json.loads((folder / "summary.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        fields = set(config) | set(config.get("server", {}))
        missing[name] = sorted(set(summary) - summary_doc) + sorted(fields - config_doc)
        assert summary["status"] == ("diverged" if name.endswith("diverged") else "complete"), summary["error"]
    assert not any(missing.values()), f"written but not in {DOC.name}: {missing}"


@pytest.mark.slow
def test_each_command_writes_the_summary_fields_the_doc_says_it_writes(run_folders):
    """The check above finds a field written but not documented; a field the code stopped writing,
    or one the doc gives to the wrong command, stayed documented (and in the docs' jq lines) unseen.
    Every run, diverged or not, writes exactly its command's fields."""
    fields = summary_fields()
    wrong = {}
    for name, folder in run_folders.items():
        writer = "train" if name.startswith("train") else "distributed"
        written, documented = set(json.loads((folder / "summary.json").read_text())), fields["both"] | fields[writer]
        if written != documented:
            wrong[name] = {"documented, not written": sorted(documented - written),
                           "written, documented for the other command or not at all": sorted(written - documented)}
    assert not wrong, f"summary.json against {DOC.name}: {wrong}"


@pytest.mark.slow
def test_the_docs_python_runs_on_a_real_run_folder(run_folders, capsys, monkeypatch):
    """The doc's Python (model.npz read with NumPy, then with cnn_core, and the recipe that reads a
    whole run) was run on the runs of its day only: a function renamed in cnn_core, or a field
    the recipe reads renamed in metrics.jsonl, left readers code that raises.  Each block runs on
    the distributed run's folder, given as the doc gives it ("runs/x", or the recipe's argv)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3, blocks
    folder = str(run_folders["run"])
    monkeypatch.setattr(sys, "argv", ["recipe.py", folder])
    for block in blocks:
        exec(compile(block.replace('"runs/x/', f'"{folder}/'), DOC.name, "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.splitlines()
    # the NumPy block, the cnn_core block (the light model's accuracy), the recipe's first and last lines
    assert out[0].endswith("(8, 1, 3, 3)") and 0 <= float(out[1]) <= 1, out
    assert out[2].startswith("updates ") and out[-1].startswith("model.npz: step"), out


# A jq command of the docs, on a line of its own or quoted inline: jq [-c -r -s] 'FILTER' FILES
JQ_LINE = re.compile(r"(?:^|`)jq (?:-\w+ )*(?:'([^']*)'|(\S+)) ([^`\n]*)", re.M)


def jq_names(jq_filter: str) -> tuple[set, set]:
    """The field names a jq filter reads (``.name``, and ``{a, b}``'s shorthand for ``{a: .a}``) and
    the record kinds it selects (``.kind == "step"``)."""
    names = {name for path in re.findall(r"(?<![\w\]])((?:\.[a-z_][a-z0-9_]*)+)", jq_filter)
             for name in path.split(".")[1:]}
    names |= {entry.strip() for braces in re.findall(r"\{([^{}]*)\}", jq_filter) for entry in braces.split(",")
              if re.fullmatch(r"\s*[a-z_][a-z0-9_]*\s*", entry)}
    return names, set(re.findall(r'\.kind == "(\w+)"', jq_filter))


def all_keys(value, found: set) -> set:
    """Every key of every object in a JSON value, however deep."""
    if isinstance(value, dict):
        found.update(value)
        value = list(value.values())
    for item in value if isinstance(value, list) else ():
        all_keys(item, found)
    return found


def test_the_jq_parser_reads_fields_and_kinds():
    """What the jq test relies on."""
    assert jq_names("{mode, status, error, staleness: .staleness.mean}") == ({"mode", "status", "error", "staleness",
                                                                              "mean"}, set())
    assert jq_names('select(.kind == "step" and .version % 20 == 0) | [.version, .lr]') == (
        {"kind", "version", "lr"}, {"step"})
    lines = JQ_LINE.findall("jq -c '{updates}' runs/a/summary.json\njq .kind runs/k/metrics.jsonl | sort\n"
                            "* `jq -c 'select(.kind == \"leave\")' runs/run/metrics.jsonl` lists")
    assert [(f or bare, files) for f, bare, files in lines] == [
        ("{updates}", "runs/a/summary.json"), (".kind", "runs/k/metrics.jsonl | sort"),
        ('select(.kind == "leave")', "runs/run/metrics.jsonl")]


@pytest.mark.slow
def test_every_field_the_docs_jq_lines_read_is_in_real_runs(run_folders):
    """The docs' jq lines (README, run-folder.md's recipes, the experiments) name summary.json and
    metrics.jsonl fields by hand; jq prints null for a field that is not there, so a misspelt or
    renamed one showed readers nulls, and no test read them.  Each field a line reads must be a
    key somewhere in the file it reads, in one of the module's real runs, and each record kind it
    selects one those runs write."""
    written = {"summary.json": set(), "metrics.jsonl": set()}
    kinds = set()
    for folder in run_folders.values():
        all_keys(json.loads((folder / "summary.json").read_text()), written["summary.json"])
        records = read_jsonl(folder / "metrics.jsonl")
        all_keys(records, written["metrics.jsonl"])
        kinds.update(record["kind"] for record in records)
    wrong, checked = [], 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for quoted, bare, files in JQ_LINE.findall(doc.read_text()):
            file = next((name for name in written if name in files), None)
            if file is None:              # scaling.json: a benchmark's, not a run's
                continue
            names, selected = jq_names(quoted or bare)
            checked += 1
            if names - written[file] or selected - kinds:
                wrong.append(f"{doc.name}: jq {quoted or bare} reads {sorted(names - written[file])}, "
                             f"selects {sorted(selected - kinds)}: not in any run's {file}")
    assert checked > 15, checked            # the lines are still found
    assert not wrong, wrong


@pytest.mark.slow
def test_every_file_the_doc_lists_is_in_a_real_run_folder_and_back(run_folders):
    """`pscnn train`'s folder holds what the table's "yes" says, `pscnn run`'s (plain, no --curve)
    what "yes" or "`pscnn run` only" says; neither holds a file the table does not list. A
    ``<name>`` in a listed path stands for any name (``logs/<name>.log``: one log per process)."""
    files = documented_files()
    for run, column, writes in (("train", 0, {"yes"}), ("run", 1, {"yes", "`pscnn run` only"})):
        folder = run_folders[run]
        listed = {name: cells[column] in writes for name, cells in files.items()}
        # a folder's entries as the table names them: logs/server.log -> logs/<name>.log, keys -> keys/
        present = {re.sub(r"[^/]+(?=\.log$)", "<name>", str(path.relative_to(folder)))
                   for path in folder.rglob("*") if path.is_file()}
        present = {name.split("/")[0] + "/" if name.split("/")[0] + "/" in files else name for name in present}
        missing = sorted(name for name, written in listed.items() if written and name not in present)
        unlisted = sorted(present - set(files))
        unexpected = sorted(name for name in present & set(files) if not listed[name])
        assert not (missing or unlisted or unexpected), (
            f"pscnn {run}'s folder ({folder}): listed in {DOC.name} but not written: {missing}; written but not "
            f"listed: {unlisted}; written though the table says not: {unexpected}")
