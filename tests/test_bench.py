"""The benchmark suite's harness: interleaving, goals, reports and exit statuses.

The suite (``python -m bench``) is not part of the test command, and its timings are never
asserted. These tests check what its figures rest on. The cases of a group alternate
round by round, and warm-up rounds are dropped. A ratio is the lcow median over the
reference median. A missed goal is reported with exit status 0, a failed case gives 1, and
a run that cannot start gives 2. The end-to-end tests run short real groups on a corpus
layer.
"""

import gzip
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import groups, inputs, references, report, run
from bench.inputs import Layer
from bench.timing import Case, CaseResult, Sample, run_interleaved
from oracle import require_tool
from tarbuild import regular, tar_bytes

REPO = Path(__file__).resolve().parent.parent
SHORT_RUN = ["--runs", "2", "--warmup", "0"]


def _layer(entries: int = 1000) -> Layer:
    return Layer(
        name="x.tar",
        path=Path("/nonexistent/x.tar"),
        kind="mixed",
        gzip=False,
        entries=entries,
        file_bytes=4_000_000,
        tar_bytes=5_000_000,
    )


def _result(name: str, seconds: list[float], *, reference: bool = False) -> CaseResult:
    return CaseResult(name, reference, [Sample(value) for value in seconds])


def _bench(*arguments: str, corpus: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bench`` from the repository, as a user runs it."""
    env = dict(os.environ)
    if corpus is not None:
        env["LCOW_CORPUS"] = str(corpus)
    return subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture
def sigterm_handler() -> Iterator[None]:
    """Restore the SIGTERM handler that ``run.main`` sets for the run's clean-up."""
    saved = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_interleaved_rounds_drop_warm_up(tmp_path: Path) -> None:
    calls: list[str] = []

    def case(name: str) -> Case:
        def run_case(scratch: Path) -> Sample:
            assert scratch.is_dir()
            assert not any(scratch.iterdir())
            calls.append(name)
            return Sample(float(len(calls)))

        return Case(name, is_reference=name == "A", run=run_case)

    results = run_interleaved([case("A"), case("B")], 3, tmp_path / "runs", warmup_rounds=2)

    assert calls == ["A", "B"] * 5
    # The first two rounds (calls 1 to 4) are the warm-up.
    assert [sample.seconds for sample in results[0].samples] == [5.0, 7.0, 9.0]
    assert [sample.seconds for sample in results[1].samples] == [6.0, 8.0, 10.0]
    assert [result.is_reference for result in results] == [True, False]
    assert list((tmp_path / "runs").iterdir()) == []


def test_failing_case_stops_alone(tmp_path: Path) -> None:
    attempts = 0

    def failing(scratch: Path) -> Sample:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            raise RuntimeError("tar failed with exit status 2")
        return Sample(1.0)

    results = run_interleaved(
        [Case("flaky", False, failing), Case("steady", True, lambda scratch: Sample(2.0))],
        4,
        tmp_path,
        warmup_rounds=0,
    )

    assert results[0].error == "RuntimeError: tar failed with exit status 2"
    assert attempts == 2
    assert len(results[0].samples) == 1
    assert len(results[1].samples) == 4


def test_case_statistics() -> None:
    result = CaseResult(
        "ApplyDiff",
        False,
        [Sample(0.3, 50_000_000), Sample(0.1, None), Sample(0.2, 70_000_000)],
    )

    assert result.median_s == 0.2
    assert (result.min_s, result.max_s) == (0.1, 0.3)
    assert result.peak_rss_bytes == 70_000_000
    assert CaseResult("x", False, [Sample(0.1)]).peak_rss_bytes is None


def test_ratio_goal_compares_medians() -> None:
    goal = report.Goal("ApplyDiff", "ratio", 1.0, "tar -xf")
    cases = [
        _result("tar -xf", [1.0, 2.0, 100.0], reference=True),
        _result("ApplyDiff", [1.5, 1.9, 0.1]),
    ]

    result = report.evaluate(goal, cases)

    assert result.measured == pytest.approx(0.75)
    assert result.met is True
    slower = report.evaluate(goal, [cases[0], _result("ApplyDiff", [2.5, 2.5, 2.5])])
    assert slower.measured == pytest.approx(1.25)
    assert slower.met is False


def test_goal_without_result_unjudged() -> None:
    goal = report.Goal("ApplyDiff", "ratio", 1.0, "tar -xf")
    failed = CaseResult("ApplyDiff", False, error="RuntimeError: tar failed")

    result = report.evaluate(goal, [_result("tar -xf", [1.0], reference=True), failed])

    assert (result.measured, result.met) == (None, None)
    rows = report.goal_rows([report.GroupResult("plain/x.tar", None, [failed], [result])])
    assert rows == [["plain/x.tar", "ApplyDiff ≤ 1 x tar -xf", "no result", "not measured"]]


def test_seconds_and_rss_goals() -> None:
    layer = _layer(entries=10_000)
    rss = report.rss_goal(layer)
    assert rss.limit == 64_000_000 + 400 * 10_000
    cases = [_result("ApplyDiff", [0.01, 0.03, 0.02])]
    cases[0].samples[0] = Sample(0.01, 69_000_000)

    assert report.evaluate(rss, cases).met is False
    within = report.evaluate(report.rss_goal(_layer(entries=20_000)), cases)
    assert within.met is True
    assert within.measured == 69_000_000
    seconds = report.evaluate(report.Goal("ApplyDiff", "seconds", 0.020), cases)
    assert (seconds.measured, seconds.met) == (0.02, True)


def test_report_ratios_and_miss_factor() -> None:
    cases = [
        _result("tar -xf", [0.5], reference=True),
        _result("tar -xf + mkfs.ext4 -d", [2.0], reference=True),
        _result("ApplyDiff", [1.0]),
    ]
    goal = report.evaluate(report.Goal("ApplyDiff", "ratio", 1.0, "tar -xf"), cases)
    group = report.GroupResult("plain/x.tar", _layer(), cases, [goal])

    rows = report.case_rows(group)
    goal_rows = report.goal_rows([group])

    assert rows[2][1] == "**lcow** ApplyDiff"
    assert rows[2][-1] == "2.00 x tar -xf; 0.50 x tar -xf + mkfs.ext4 -d"
    assert rows[2][4:6] == ["1,000", "5"]  # 1,000 entries and 5 MB in one second
    assert rows[0][-1] == ""
    assert goal_rows == [
        ["plain/x.tar", "ApplyDiff ≤ 1 x tar -xf", "2.00 x", "missed: 2.00 x the limit"]
    ]
    table = report.markdown_table(report.GOAL_HEADER, goal_rows)
    assert table.splitlines()[0] == "| group | goal | measured | verdict |"


def test_json_keeps_every_sample() -> None:
    cases = [_result("tar -xf", [0.5, 0.7], reference=True), _result("ApplyDiff", [0.4, 0.6])]
    goal = report.evaluate(report.Goal("ApplyDiff", "ratio", 1.0, "tar -xf"), cases)

    document = report.to_json(report.GroupResult("plain/x.tar", _layer(), cases, [goal]))

    assert [case["seconds"] for case in document["cases"]] == [[0.5, 0.7], [0.4, 0.6]]
    assert document["goals"] == [
        {"goal": "ApplyDiff ≤ 1 x tar -xf", "measured": 0.5 / 0.6, "allowed": 1.0, "met": True}
    ]
    assert document["input"]["entries"] == 1000


def test_run_order_generated_last(tmp_path: Path) -> None:
    corpus = [tmp_path / f"{name}.tar" for name in ("L1-base", "L2-umoci", "L2-buildah")]
    generated = [tmp_path / "many-small-files.tar", tmp_path / "many-small-files.tar.gz"]

    ids = [group.group_id for group in groups.plan(corpus, generated)]

    assert ids[:5] == [
        "service_vm_start",
        "create_read_write/20GiB",
        "create_read_write/1TiB",
        "changes/L2-umoci.tar",
        "changes/L2-buildah.tar",
    ]
    assert ids[-3:] == [
        "plain/many-small-files.tar",
        "gzip/many-small-files.tar.gz",
        "export/many-small-files.tar",
    ]


def test_convert_rss_excludes_spawner(tmp_path: Path) -> None:
    layer = tmp_path / "small.tar"
    layer.write_bytes(tar_bytes([regular("file", b"x" * 100_000)]))

    # A spawner of 256 MB: the child's figure must not include it.
    spawner = (
        "import subprocess, sys\n"
        "ballast = b'\\1' * (256 << 20)\n"
        "command = [sys.executable, '-m', 'bench.child', 'convert', '--input', sys.argv[1],"
        " '--output', sys.argv[2]]\n"
        "sys.exit(subprocess.run(command).returncode)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", spawner, str(layer), str(tmp_path / "layer.vhd")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported["entries"] == 1
    assert reported["self_peak_rss_bytes"] > 5_000_000
    assert reported["self_peak_rss_bytes"] < 200_000_000


def test_huge_files_build_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "HUGE_FILE_BYTES", 2 << 20)
    digests = []

    for name in ("first", "second"):
        monkeypatch.setenv("LCOW_BENCH_CACHE", str(tmp_path / name))
        layer = inputs.cache_folder() / "huge-files.tar"
        inputs.ensure_built(layer)
        digests.append(hashlib.sha256(layer.read_bytes()).hexdigest())

        record = json.loads(layer.with_name("huge-files.tar.build.json").read_text())
        assert record["tar_bytes"] == layer.stat().st_size
        described = inputs.describe(layer)
        assert described.entries == 5  # ".", "./data" and three files
        assert described.file_bytes == 3 * (2 << 20)
        assert sorted(path.name for path in layer.parent.iterdir()) == [
            "counts.json",
            "huge-files.tar",
            "huge-files.tar.build.json",
        ]

    assert digests[0] == digests[1]


def test_gzip_variant_same_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LCOW_BENCH_CACHE", str(tmp_path))
    plain = tmp_path / "many-small-files.tar"
    plain.write_bytes(
        tar_bytes([regular(f"file-{number}", bytes([number]) * 1000) for number in range(3)])
    )

    inputs.ensure_built(tmp_path / "many-small-files.tar.gz")

    packed = tmp_path / "many-small-files.tar.gz"
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    described = inputs.describe(packed)
    assert described.gzip is True
    assert described.entries == 3
    assert described.tar_bytes == plain.stat().st_size


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--runs", "0"], "invalid --runs or --warmup"),
        (["--warmup", "-1"], "invalid --runs or --warmup"),
        (["--only", "no-such-group"], "no group matches --only"),
    ],
)
@pytest.mark.root
def test_bad_options_exit_2(arguments: list[str], message: str) -> None:
    result = _bench(*arguments)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.root
def test_missing_layer_exits_2(tmp_path: Path) -> None:
    result = _bench("--only", "plain/L2-umoci.tar", *SHORT_RUN, corpus=tmp_path)

    assert result.returncode == 2, result.stderr
    assert f"layer {tmp_path}/out/layers/L2-umoci.tar not found" in result.stderr
    assert "LCOW_CORPUS" in result.stderr


@pytest.mark.root
def test_missing_gnu_time_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run, "GNU_TIME", "/nonexistent/time")

    status = run.main(["--only", "create_read_write/20GiB"])

    assert status == 2
    assert "missing tools: /nonexistent/time" in capsys.readouterr().err


@pytest.mark.root
def test_missed_goal_exits_0(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sigterm_handler: None,
) -> None:
    # A limit no machine meets: the run must report the miss and still succeed.
    monkeypatch.setattr(groups, "CREATE_READ_WRITE_LIMIT_S", 1e-9)
    output = tmp_path / "results.json"

    # Both sandbox sizes, so the 1 TiB cache is made and copied too.
    arguments = ["--only", "create_read_write", *SHORT_RUN, "--json", str(output)]
    status = run.main([*arguments, "--output-dir", str(tmp_path / "out")])

    assert status == 0
    document = json.loads(output.read_text())
    assert [group["group"] for group in document["groups"]] == [
        "create_read_write/20GiB",
        "create_read_write/1TiB",
    ]
    report_text = capsys.readouterr().out
    for group in document["groups"]:
        names = [case["name"] for case in group["cases"]]
        assert names == ["cp --sparse=always", "CreateReadWrite"]
        for case in group["cases"]:
            assert case["error"] is None
            assert len(case["seconds"]) == 2
        assert group["goals"][0]["met"] is False
        assert f"| {group['group']} | CreateReadWrite ≤ 1e-06 ms |" in report_text
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.root
def test_failed_case_exits_1(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sigterm_handler: None,
) -> None:
    def broken_copy(cached: Path) -> Case:
        def fail(scratch: Path) -> Sample:
            raise RuntimeError(f"cp --sparse=always {cached} failed with exit status 1")

        return Case("cp --sparse=always", is_reference=True, run=fail)

    monkeypatch.setattr(references, "sparse_copy", broken_copy)

    status = run.main(
        ["--only", "create_read_write/20GiB", *SHORT_RUN, "--output-dir", str(tmp_path)]
    )

    assert status == 1
    measurements = capsys.readouterr().out
    assert "| create_read_write/20GiB | cp --sparse=always | failed |" in measurements
    assert "RuntimeError: cp --sparse=always" in measurements
    # The other case of the group still ran and has its row.
    assert "| create_read_write/20GiB | **lcow** CreateReadWrite |" in measurements


def _median_of(group: dict[str, Any], name: str) -> float:
    case = next(case for case in group["cases"] if case["name"] == name)
    seconds: list[float] = case["seconds"]
    return statistics.median(seconds)


@pytest.mark.root
def test_corpus_groups_run_end_to_end(
    corpus: Path, tmp_path: Path, unmount_leftovers: None
) -> None:
    output = tmp_path / "results.json"

    result = _bench(
        "--only",
        "plain/L2-umoci.tar",
        "--only",
        "export/L2-umoci.tar",
        *SHORT_RUN,
        "--output-dir",
        str(tmp_path / "out"),
        "--json",
        str(output),
        corpus=corpus.parent.parent,
    )

    assert result.returncode == 0, result.stderr
    plain, export = json.loads(output.read_text())["groups"]
    assert plain["input"]["name"] == "L2-umoci.tar"
    assert plain["input"]["entries"] > 2000
    names = [case["name"] for case in plain["cases"]]
    assert names[:2] == ["tar -xf", "tar -xf + mkfs.ext4 -d"]
    assert {"ApplyDiff", "ApplyDiff, cold start", "lcow tar2vhd"} <= set(names)
    for case in plain["cases"] + export["cases"]:
        assert case["error"] is None
        assert len(case["seconds"]) == 2
        assert all(value > 0 for value in case["seconds"])
    apply_diff = next(case for case in plain["cases"] if case["name"] == "ApplyDiff")
    assert all(value > 1_000_000 for value in apply_diff["peak_rss_bytes"])
    tar2vhd = next(case for case in plain["cases"] if case["name"] == "lcow tar2vhd")
    assert all(value > 1_000_000 for value in tar2vhd["peak_rss_bytes"])
    goals = {goal["goal"]: goal for goal in plain["goals"]}
    shell_route = goals["ApplyDiff ≤ 0.4 x tar -xf + mkfs.ext4 -d"]
    assert shell_route["measured"] == pytest.approx(
        _median_of(plain, "ApplyDiff") / _median_of(plain, "tar -xf + mkfs.ext4 -d")
    )
    assert shell_route["met"] is (shell_route["measured"] <= 0.4)
    assert export["cases"][0]["name"] == "tar -c of the mounted image"
    assert [goal["met"] is not None for goal in export["goals"]] == [True, True, True]
    assert "## Goals" in result.stdout
    assert "| export/L2-umoci.tar |" in result.stdout
    # The run unmounted the image it exported and removed its outputs.
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
    assert list((tmp_path / "out").iterdir()) == []


def _mount_points() -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]


def _bench_mounts() -> list[str]:
    return [point for point in _mount_points() if "lcow-bench" in point]


@pytest.fixture
def unmount_leftovers() -> Iterator[None]:
    """Unmount what a failed run left mounted, deepest first, after the test's own checks."""
    before = set(_mount_points())
    yield
    for point in sorted(set(_mount_points()) - before, key=len, reverse=True):
        subprocess.run(["umount", point], check=False)


@pytest.mark.root
def test_other_groups_run_end_to_end(corpus: Path, tmp_path: Path, unmount_leftovers: None) -> None:
    output = tmp_path / "results.json"
    folders_before = set(Path("/tmp").glob("lcow-bench-*"))

    # No --output-dir: the run mounts its own tmpfs, as a user's run does.
    result = _bench(
        "--only",
        "service_vm_start",
        "--only",
        "changes/L2-umoci.tar",
        "--only",
        "gzip/L2-umoci.tar.gz",
        *SHORT_RUN,
        "--json",
        str(output),
        corpus=corpus.parent.parent,
    )

    assert result.returncode == 0, result.stderr
    groups_run = {group["group"]: group for group in json.loads(output.read_text())["groups"]}
    assert list(groups_run) == ["service_vm_start", "changes/L2-umoci.tar", "gzip/L2-umoci.tar.gz"]
    for group in groups_run.values():
        for case in group["cases"]:
            assert case["error"] is None
            assert len(case["seconds"]) == 2
    start_goals = [goal["goal"] for goal in groups_run["service_vm_start"]["goals"]]
    assert start_goals == [
        "service VM start and stop, prestarted ≤ 50 ms",
        "service VM start and stop, cold ≤ 50 ms",
    ]
    changes, diff_size = groups_run["changes/L2-umoci.tar"]["cases"]
    assert all(detail["changes"] > 0 for detail in changes["detail"])
    assert all(detail["size_bytes"] > 0 for detail in diff_size["detail"])
    gzip_group = groups_run["gzip/L2-umoci.tar.gz"]
    assert gzip_group["cases"][0]["name"] == "tar -xzf"
    assert [goal["met"] is not None for goal in gzip_group["goals"]] == [True] * 4
    assert _bench_mounts() == []
    assert set(Path("/tmp").glob("lcow-bench-*")) == folders_before


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--floor", "L2-umoci.tar", "reading side of L2-umoci.tar, 5 interleaved rounds"),
        ("--profile", "L2-umoci.tar", "convert_tar of L2-umoci.tar: "),
        ("--profile", "export:L2-umoci.tar", "export of L2-umoci.tar: "),
        ("--perf", "L2-umoci.tar", "share of samples by library:"),
        ("--share", "L2-umoci.tar", "ApplyDiff of L2-umoci.tar, 9 rounds each, medians:"),
    ],
)
@pytest.mark.root
def test_diagnostic_modes_run(
    corpus: Path, option: str, value: str, expected: str, unmount_leftovers: None
) -> None:
    if option == "--perf":
        require_tool("perf")

    result = _bench(option, value, corpus=corpus.parent.parent)

    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert _bench_mounts() == []
