"""``python -m bench``: measure lcow against standard tools, interleaved, in one run.

docs/benchmarks.md describes each measurement and shows the results of a full run. The
run exits with status 0 when it measured everything, whatever the results; 1 when a case
failed; 2 when it cannot run at all (not root, a tool or an input missing, bad options).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Final

from bench import groups, inputs, machine, report
from bench.floor import floor
from bench.output import output_folder
from bench.perf import perf
from bench.profile import profile
from bench.report import GroupResult
from bench.share import share
from bench.timing import CASE_ERRORS, GNU_TIME, CaseResult, run_interleaved

REQUIRED_TOOLS: Final = ("tar", "gzip", "mkfs.ext4", "du", "find", "cp", "mount", "umount")
EXIT_CASE_FAILED: Final = 1
EXIT_CANNOT_RUN: Final = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure lcow against tar, mkfs.ext4 and cp on the same inputs.",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="Timed runs of each case (default 5, at least 1)."
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="Untimed rounds before the timed ones (default 1).",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="Run only the groups whose id contains NAME, such as plain/, L3 or "
        "create_read_write; repeatable. --list shows the ids.",
    )
    parser.add_argument("--list", action="store_true", help="List the group ids and exit.")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="Folder for outputs (default: a tmpfs mounted for the run as root, else /dev/shm).",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="Write every sample to FILE.")
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="Profile one lcow measurement instead: [convert_tar|export:]INPUT, for example "
        "L3-node-modules.tar; prints the top 20 entries of cProfile.",
    )
    parser.add_argument(
        "--perf",
        metavar="INPUT",
        help="Sample one lcow measurement with Linux perf instead, [convert_tar|export:]INPUT. It "
        "prints the share of each library and the top 30 functions, compiled ones included.",
    )
    parser.add_argument(
        "--floor",
        metavar="INPUT",
        help="Time what lies under lcow's time on INPUT instead: a bare libarchive loop and "
        "lcow's TarReader, without and with the data written, against tar -xf and the shell "
        "route; Ext4Reader.walk and export_tar against tar -c.",
    )
    parser.add_argument(
        "--share",
        metavar="INPUT",
        help="Split ApplyDiff of INPUT into the tar2ext4 request and the driver's steps "
        "around it instead, with and without the next spare's start, next to convert_tar.",
    )
    parser.add_argument(
        "--no-shell-route",
        action="store_true",
        help="With --floor, leave out the shell route, which takes minutes per round on "
        "inputs of many small files.",
    )
    return parser


def _cannot_run(message: str) -> int:
    print(f"bench: {message}", file=sys.stderr)
    return EXIT_CANNOT_RUN


def _stop_on_sigterm(signal_number: int, frame: FrameType | None) -> None:
    del frame
    # SystemExit unwinds the with blocks, which unmount and remove what the run made.
    raise SystemExit(128 + signal_number)


def _check(arguments: argparse.Namespace, selected: list[groups.Group]) -> str | None:
    """Return why the run cannot start, or None."""
    if arguments.runs < 1 or arguments.warmup < 0:
        return "invalid --runs or --warmup: use --runs 1 or more and --warmup 0 or more"
    if os.geteuid() != 0:
        return "the benchmark needs root: it loop-mounts layer images and extracts device nodes"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not Path(GNU_TIME).exists():
        missing.append(GNU_TIME)  # measures the peak RSS of lcow tar2vhd
    if missing:
        return (
            f"missing tools: {', '.join(missing)}; install tar, gzip, e2fsprogs, mount and "
            "time (GNU time)"
        )
    generated = set(inputs.generated_paths())
    for group in selected:
        path = group.layer_path
        if path is not None and path not in generated and not path.exists():
            return (
                f"layer {path} not found; build the corpus as docs/corpus.md says, or set "
                "LCOW_CORPUS to its folder"
            )
    if not selected:
        return "no group matches --only; --list shows the ids"
    return None


def _select(plan: list[groups.Group], only: list[str] | None) -> list[groups.Group]:
    if not only:
        return plan
    return [group for group in plan if any(name in group.group_id for name in only)]


def _print_report(
    description: dict[str, Any], results: list[GroupResult], command: str, runs: int
) -> None:
    print("\n## Machine\n")
    for key, value in description.items():
        print(f"- {key}: {value}")
    print(f"\nCommand: `{command}`; {runs} timed runs per case, medians.\n")
    print("## Measurements\n")
    rows = [row for group in results for row in report.case_rows(group)]
    print(report.markdown_table(report.CASE_HEADER, rows))
    print("\n## Goals\n")
    print(report.markdown_table(report.GOAL_HEADER, report.goal_rows(results)))


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    plan = groups.plan(inputs.corpus_paths(), inputs.generated_paths())
    if arguments.list:
        for group in plan:
            print(group.group_id)
        return 0
    selected = _select(plan, arguments.only)
    replaces_suite = arguments.profile or arguments.perf or arguments.floor or arguments.share
    if replaces_suite:
        selected = []
    else:
        problem = _check(arguments, selected)
        if problem is not None:
            return _cannot_run(problem)

    try:
        bytecode = machine.compile_lcow()
    except OSError as err:
        return _cannot_run(str(err))

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    with output_folder(arguments.output_dir) as folder:
        if replaces_suite:
            try:
                if arguments.profile:
                    print(profile(arguments.profile, folder))
                elif arguments.perf:
                    print(perf(arguments.perf, folder))
                elif arguments.share:
                    print(share(arguments.share, folder))
                else:
                    print(floor(arguments.floor, folder, shell_route=not arguments.no_shell_route))
            except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as err:
                return _cannot_run(str(err))
            return 0

        description = machine.describe(
            folder, [inputs.corpus_folder(), inputs.cache_folder()], bytecode
        )
        started = time.monotonic()
        results: list[GroupResult] = []
        for number, group in enumerate(selected, 1):
            print(f"[{number}/{len(selected)}] {group.group_id}", file=sys.stderr, flush=True)
            layer = group.layer()
            group_folder = folder / f"group-{number}"
            group_folder.mkdir()
            try:
                with group.prepare(group_folder, layer) as cases:
                    case_results = run_interleaved(
                        cases, arguments.runs, group_folder / "runs", warmup_rounds=arguments.warmup
                    )
            except CASE_ERRORS as err:
                # A group whose preparation fails is reported as one failed case.
                print(f"  {group.group_id}: failed: {err}", file=sys.stderr, flush=True)
                case_results = [
                    CaseResult("preparation", False, error=f"{type(err).__name__}: {err}")
                ]
            goals = [report.evaluate(goal, case_results) for goal in group.goals(layer)]
            results.append(GroupResult(group.group_id, layer, case_results, goals))
            shutil.rmtree(group_folder, ignore_errors=True)
        description["load average at end"] = machine.load_average()
        description["duration"] = f"{(time.monotonic() - started) / 60:.1f} min"

    _print_report(description, results, command, arguments.runs)
    if arguments.json is not None:
        document = {
            "command": command,
            "runs": arguments.runs,
            "warmup_rounds": arguments.warmup,
            "machine": description,
            "groups": [report.to_json(group) for group in results],
        }
        arguments.json.write_text(json.dumps(document, indent=1) + "\n")
    failed = any(case.error is not None for group in results for case in group.cases)
    return EXIT_CASE_FAILED if failed else 0
