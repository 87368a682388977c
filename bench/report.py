"""The benchmark report: a Markdown table with ratios to each peer, a PNG chart, and the profile's top costs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.receivers import REFERENCE

if TYPE_CHECKING:
    from bench.__main__ import Run
    from bench.forwarding import LocalRow, Parameters, PathRow
    from bench.receivers import Receiver

THIS = "this daemon"


def _profile_top(stacks: Path, limit: int = 15) -> list[tuple[str, float, float]]:
    """(function, share of samples anywhere on the stack, share as the innermost frame) from py-spy's raw output.

    py-spy leaves idle threads (blocked in select, sleep, recv) out unless asked, so the shares are of busy time.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
                  for frame in frames_text.split(";") if " (" in frame]  # fmt: skip
        if not frames:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return []
    return [(frame, inclusive[frame] / total, own[frame] / total) for frame, _ in own.most_common(limit)]


# Throughput goals: this daemon's files/s over the reference's, in one run, every object flushed before Success.
GOALS = {1: 0.7, 16: 1.0, 64: 1.3}


def _targets(results: list[Run], large: list[Run], held: tuple[int, float, float] | None) -> list[str]:
    """The goals, each marked reached or not with the measured figure."""
    by_key = {(run.receiver, run.concurrency): run for run in results}
    lines = ["| target | measured | reached |", "| --- | --- | --- |"]
    for concurrency, goal in GOALS.items():
        mine, theirs = by_key.get((THIS, concurrency)), by_key.get((REFERENCE, concurrency))
        target = f"throughput >= {goal:.1f}x {REFERENCE} at {concurrency} association{'s' * (concurrency > 1)}"
        if mine and theirs:
            ratio = mine.files_per_second / theirs.files_per_second
            lines.append(f"| {target} | {mine.files_per_second:.0f} vs {theirs.files_per_second:.0f} files/s "
                         f"({ratio:.2f}x) | {'yes' if ratio >= goal else 'no'} |")  # fmt: skip
        else:
            lines.append(f"| {target} | not measured in this run | - |")
    gibibyte = [run for run in large if run.megabytes > 1000]
    if gibibyte:
        peak = gibibyte[0].peak_pss_mib
        reached = "yes" if peak < 150 else "no"
        lines.append(f"| peak PSS < 150 MiB receiving a 1 GiB object | {peak:.0f} MiB | {reached} |")
    else:
        lines.append("| peak PSS < 150 MiB receiving a 1 GiB object | not measured in this run (BENCH_LARGE=0) | - |")
    if held:
        accepted, seconds, peak = held
        reached = "yes" if peak < 2048 and accepted >= 300 else "no"
        lines.append(
            f"| 300 concurrent associations within 2 GiB | {accepted} held, {peak:.0f} MiB, "
            f"{seconds:.0f} s to establish | {reached} |"
        )
    return lines


def s3_section(results: list[tuple[Run, float]], large: list[Run], latency: float, repeats: int) -> str:
    """The S3-mode table: files/s at each concurrency against the bound the request latency sets."""
    lines = [
        "## S3 mode (this daemon with DICOM_BUCKET)",
        "",
        f"S3 is moto_server behind a proxy that holds every answer back {latency * 1000:.0f} ms (bench/s3.py gives "
        "the source of that figure) and keeps connections alive, as S3 does. Each object is acknowledged only "
        "after S3's checksum-verified answer, and a modality sends its next object only after the answer, so `n` "
        f"associations store at most `n` / latency objects a second. Medians of {repeats} runs; each run counts "
        "only if every object read back from the bucket has the pixel data that was sent. The stand-in "
        "(moto_server and the proxy) runs on the same cores: its CPU per object is given, since where the cores "
        "are saturated, it rather than the latency or the daemon sets the rate.",
        "",
        "| assoc. | files/s | bound | share of bound | daemon CPU ms/object | stand-in CPU ms/object | "
        "peak PSS MiB | verified |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run, stand_in_cpu in results:
        bound = run.concurrency / latency
        lines.append(
            f"| {run.concurrency} | {run.files_per_second:.1f} | {bound:.0f} | {run.files_per_second / bound:.0%} | "
            f"{run.cpu_seconds / run.files * 1000:.1f} | {stand_in_cpu / run.files * 1000:.1f} | "
            f"{run.peak_pss_mib:.0f} | "
            f"{'yes' if run.verified else 'NO: ' + run.problem} |"
        )
    for run in large:
        lines += [
            "",
            f"One {run.megabytes:.0f} MB object alone (multipart upload): {run.seconds:.1f} s from the "
            f"first byte sent to Success, peak PSS {run.peak_pss_mib:.0f} MiB, verified {run.verified}.",
        ]
    return "\n".join(lines)


def forwarding_section(paths: list[PathRow], local: list[LocalRow], parameters: Parameters) -> str:
    """Both paths into HealthImaging side by side, seconds from the acknowledgement; then the receive rates."""
    from bench.forwarding import FORWARDING_WINDOW_SECONDS, GOAL_P50_SECONDS, GOAL_RECEIVE_RATIO
    from bench.import_workflow import JOB_SECONDS_SOURCE

    workflow = parameters.workflow
    checks = workflow.checks(parameters.job_seconds)
    after = workflow.recorded_after(parameters.job_seconds)
    window = "the default"
    if parameters.batch_window != parameters.default_batch_window:
        window = f"exported; the default is {parameters.default_batch_window:g} s"
    runs = f"{parameters.repeats} run{'s' * (parameters.repeats > 1)}"
    lines = [
        "## Time to HealthImaging: StoreDICOM forwarding and the import job",
        "",
        f"The daemon in S3 mode (S3 through the {parameters.s3_latency * 1000:.0f} ms proxy), {parameters.files} "
        f"objects of {parameters.kib} KiB of one study sent by pynetdicom, one thread per association; each "
        "instance counts from the moment its C-STORE Success arrived at the modality. bench/forwarding.py and "
        "bench/import_workflow.py give the sources of every figure below.",
        "",
        f"- StoreDICOM forwarding: to StoreDICOM's answer, as the batch's manifest records it; the stand-in answers "
        f"each request after {parameters.stow_latency:g} s (an assumption: no StoreDICOM latency is published). "
        f"That run's batch closes after {FORWARDING_WINDOW_SECONDS} s of quiet so that its manifest comes soon; "
        "the window does not move the answers' times.",
        f"- Import job: measured to the batch's manifest seen in the bucket, the batch closing after "
        f"BATCH_WINDOW_SECONDS {parameters.batch_window:g} s of quiet ({window}), plus a model of the rest: an "
        "import job of "
        f"{parameters.job_seconds:g} s (BENCH_IMPORT_JOB_SECONDS; {JOB_SECONDS_SOURCE}), seen finished by the "
        f"workflow's check at {after:g} s after its start (checks at "
        f"{', '.join(f'{age:g}' for age in checks)} s: POLL_INTERVAL_SECONDS {workflow.poll_interval_seconds}, "
        "then a tenth of the job's age, at least that, at most 900 s). EventBridge's delivery and the Lambda "
        "functions' run times are not included: the import-job figures are lower bounds.",
        "",
        f"| path | assoc. | p50 s | p99 s | measured part | p50 under {GOAL_P50_SECONDS:g} s |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in paths:
        forwarding, window, job = row.forwarding, row.to_manifest, row.import_job
        left = f"; {forwarding.left_to_import} left to the import job" if forwarding.left_to_import else ""
        lines += [
            f"| StoreDICOM forwarding | {row.associations} | {forwarding.p50:.2f} | {forwarding.p99:.2f} | "
            f"all of it ({len(forwarding.seconds)} instances{left}) | "
            f"{'yes' if forwarding.p50 < GOAL_P50_SECONDS else 'no'} |",
            f"| import job | {row.associations} | {job.p50:.0f} | {job.p99:.0f} | to the manifest: p50 "
            f"{window.p50:.1f} s, p99 {window.p99:.1f} s; then {row.after_manifest:g} s modelled | - |",
        ]
    lines += [
        "",
        "The receive rate of the same runs, forwarding on (the StoreDICOM run) and off (the import-job run), and "
        "the forwarding rate (instances StoreDICOM stored per second, from the first acknowledgement to the last "
        "answer):",
        "",
        f"| assoc. | received/s on | off | on / off | unchanged (>= {GOAL_RECEIVE_RATIO:.0%}) | forwarded/s |",
        "| ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    lines += [_receive_rate_cells(row, GOAL_RECEIVE_RATIO) for row in paths]
    measured = [row for row in paths if row.cpu_forwarding is not None and row.cpu_plain is not None]
    if measured:
        lines += [
            "",
            "CPU per object while the modality sent, in milliseconds, by process, forwarding on and off. All of them "
            "share this machine's cores, so the stand-ins' work slows the receive rate above; in the stack S3 and "
            "HealthImaging do that work, and the daemon's own difference is what forwarding costs a task.",
            "",
            "| assoc. | daemon on | off | difference | S3 stand-in on | off | StoreDICOM stand-in |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in measured:
            on, off = row.cpu_forwarding, row.cpu_plain
            assert on is not None and off is not None
            lines.append(
                f"| {row.associations} | {on.daemon:.2f} | {off.daemon:.2f} | {on.daemon - off.daemon:+.2f} | "
                f"{on.s3_stand_in:.2f} | {off.s3_stand_in:.2f} | {on.stow_stand_in:.2f} |"
            )
    lines += [
        "",
        f"The local store (the standalone gateway), DCMTK storescu as the modality, forwarding on then off, medians "
        f"of {runs}; ForwardLatency is the daemon's own metric, from the stored object to "
        "StoreDICOM's answer, over every run. The stand-in runs on the same cores as the daemon, which HealthImaging "
        "would not.",
        "",
        "| assoc. | received/s on | off | on / off | unchanged (>= "
        f"{GOAL_RECEIVE_RATIO:.0%}) | forwarded/s | instances/request | ForwardLatency p50 s | p99 s | "
        "daemon CPU ms/object on | off |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"{_receive_rate_cells(local_row, GOAL_RECEIVE_RATIO)} {local_row.instances_per_request:.1f} | "
        f"{local_row.forward_latency.p50:.2f} | {local_row.forward_latency.p99:.2f} | "
        f"{local_row.cpu_ms_per_object_forwarding:.2f} | {local_row.cpu_ms_per_object_plain:.2f} |"
        for local_row in local
    ]
    return "\n".join(lines)


def _receive_rate_cells(row: PathRow | LocalRow, goal_ratio: float) -> str:
    """The cells both receive-rate tables start with: associations, received/s with forwarding on and off, their
    ratio against the goal, and forwarded/s."""
    ratio = row.received_per_second_forwarding / row.received_per_second_plain
    return (
        f"| {row.associations} | {row.received_per_second_forwarding:.0f} | {row.received_per_second_plain:.0f} "
        f"| {ratio:.3f} | {'yes' if ratio >= goal_ratio else 'no'} | {row.forwarded_per_second:.0f} |"
    )


def _chart(path: Path, results: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for name in dict.fromkeys(run.receiver for run in results):
        runs = sorted((run for run in results if run.receiver == name), key=lambda run: run.concurrency)
        style = {"linewidth": 2.5} if name == THIS else {"linewidth": 1.2}
        left.plot([r.concurrency for r in runs], [r.files_per_second for r in runs], marker="o", label=name, **style)
        right.plot([r.concurrency for r in runs], [r.cpu_seconds / r.files * 1000 for r in runs], marker="o", **style)
    for axis, title in ((left, "objects per second"), (right, "receiver CPU ms per object")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([1, 4, 16, 64], labels=["1", "4", "16", "64"])
        axis.set_xlabel("parallel associations")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write(
    directory: Path,
    results: list[Run],
    large: list[Run],
    receivers: list[Receiver],
    machine: dict[str, str],
    stacks: Path | None,
    sections: list[str],
    settings: dict[str, Any],
) -> None:
    lines = [
        "# Ingest benchmark",
        "",
        "Generated by `make bench` (bench/). DCMTK `storescu` sends the corpus over loopback, one process per "
        "association, the files split evenly between them, `TCP_NODELAY=1` in its environment. Each receiver "
        "starts empty for each run; a run counts only if every object the receiver stored parses and its pixel "
        "data equals what was sent (SHA-256) and nothing is missing. Figures are medians of "
        f"{settings['repeats']} runs. Corpus: {settings['files']} CT-like slices (512x512, 16-bit, Explicit VR "
        f"Little Endian, 100 slices per series, two series per study), "
        f"{results[0].megabytes if results else 0:.0f} MB. Total bench time {settings['minutes']:.1f} min. "
        f"Daemon measured: {settings['source']}, local store.",
        "",
        "Only this daemon makes every object durable (fsync of the file and its directory) before answering; "
        "the others answer once the bytes are in the page cache, so the comparison favours them.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        "## Receivers",
        "",
        *(f"- {r.name}: {r.note if r.available else 'not installed: ' + r.note}" for r in receivers),
        "",
        "## Results",
        "",
        "| receiver | assoc. | files/s | MB/s | CPU s | CPU ms/object | peak PSS MiB (tree) | verified |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in sorted(results, key=lambda run: (run.concurrency, run.receiver != THIS, run.receiver)):
        lines.append(
            f"| {run.receiver} | {run.concurrency} | {run.files_per_second:.1f} | {run.megabytes_per_second:.1f} | "
            f"{run.cpu_seconds:.1f} | {run.cpu_seconds / run.files * 1000:.1f} | {run.peak_pss_mib:.0f} | "
            f"{'yes' if run.verified else 'NO: ' + run.problem} |"
        )
    lines += ["", "## This daemon relative to each peer (same corpus, same concurrency)", "",
              "Throughput ratio > 1 means this daemon is faster; CPU and memory ratios > 1 mean it uses more.", "",
              "| peer | assoc. | throughput | CPU | peak PSS |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    ours = {run.concurrency: run for run in results if run.receiver == THIS}
    for run in sorted(results, key=lambda run: (run.receiver, run.concurrency)):
        mine = ours.get(run.concurrency)
        if run.receiver == THIS or mine is None:
            continue
        lines.append(
            f"| {run.receiver} | {run.concurrency} | {mine.files_per_second / run.files_per_second:.2f} | "
            f"{mine.cpu_seconds / max(run.cpu_seconds, 0.01):.2f} | {mine.peak_pss_mib / run.peak_pss_mib:.2f} |"
        )
    lines += ["", "## Targets", "", *_targets(results, large, settings.get("held"))]
    if large:
        lines += ["", "## Large objects (this daemon, one association)", "",
                  "| object | seconds | peak PSS MiB | verified |", "| --- | ---: | ---: | --- |"]  # fmt: skip
        lines += [f"| {run.megabytes:.0f} MB | {run.seconds:.1f} | {run.peak_pss_mib:.0f} | {run.verified} |"
                  for run in large]  # fmt: skip
    if stacks is not None:
        top = _profile_top(stacks)
        lines += ["", "## Where this daemon's time goes (py-spy, 16 associations)", "",
                  "Share of busy samples (idle threads excluded), by innermost function.", "",
                  "| function | own | on stack |", "| --- | ---: | ---: |"]  # fmt: skip
        lines += [f"| `{frame}` | {own:.1%} | {inclusive:.1%} |" for frame, inclusive, own in top]
    for section in sections:
        lines += ["", section]
    lines += ["", "![throughput and CPU per object](ingest.png)", ""]
    directory.joinpath("REPORT.md").write_text("\n".join(lines))
    if results:
        _chart(directory / "ingest.png", results)
