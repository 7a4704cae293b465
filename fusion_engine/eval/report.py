"""Per-image score rows (one CSV per process) and the markdown report built from all of them."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from ..scoring.metrics import METRICS
from ..utils.io import append_line, write_text

# Scores some worlds add (the toy world's transparent measures); empty in rows that lack them.
EXTRA_METRICS = ("subject_iou", "style_fid")
COLUMNS = ("pair", "policy", "seed", *METRICS, *EXTRA_METRICS, "wall_s", "peak_mem_mb", "mem_kind", "device", "rank",
           "image")
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c not in EXTRA_METRICS)
METRIC_TITLES = {"style_sim": "Style Sim", "clip_score": "CLIP Score", "dino_score": "DINO Score",
                 "subject_iou": "Subject IoU", "style_fid": "Style Fid"}
SCORES_HEADING = "## Scores (mean ± std over images, %)"
CI_HEADING = "## Means with 95% bootstrap confidence intervals (over images, %)"
PAIRED_HEADING = "## Paired differences against `direct` (same pair and seed; 95% bootstrap CI, percentage points)"
BASELINE = "direct"


def shard_csv(out: Path, rank: int) -> Path:
    return Path(out) / "scores" / f"scores.rank{rank}.csv"


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _header(path: Path) -> list[str] | None:
    """The file's header if its first line is whole and names the required columns, else ``None``."""
    with path.open(newline="") as handle:
        first = handle.readline()
    if not first.endswith("\n"):
        return None
    fields = next(csv.reader([first]))
    return fields if set(REQUIRED_COLUMNS) <= set(fields) else None


def append_row(path: Path, row: dict) -> None:
    """One whole line per write, flushed and synced: a crash loses at most the image being made.

    A file whose header is torn (a crash while starting it: no row can follow a torn header) is moved aside
    to ``NAME.torn`` and started again; a torn last row stays where it is and the new row starts a fresh line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = None
    if path.exists() and path.stat().st_size:
        fields = _header(path)  # keep the header the file was started with (older files lack EXTRA_METRICS)
        if fields is None:
            os.replace(path, path.with_name(path.name + ".torn"))
    if fields is None:
        fields = list(COLUMNS)
        append_line(path, _csv_line(fields))
    append_line(path, _csv_line(row.get(key, "") for key in fields))


def read_rows(out: Path, problems: list[str] | None = None) -> dict[tuple, dict]:
    """Every whole row of every shard file, keyed by (pair, policy, seed); a later row replaces an earlier one.

    Torn records (a header or a line cut short by a crash, a line with the wrong number of fields) are skipped;
    a line per file saying what was skipped goes to ``problems`` when given.
    """
    rows = {}
    for path in sorted((Path(out) / "scores").glob("scores.rank*.csv")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        if not lines:
            continue
        header = next(csv.reader([lines[0]]))
        if not lines[0].endswith("\n") or not set(REQUIRED_COLUMNS) <= set(header):
            if problems is not None:
                problems.append(f"{path}: torn header ({len(text)} bytes): the file was skipped")
            continue
        torn = 0
        for line in lines[1:]:
            fields = next(csv.reader([line]), [])
            row = dict(zip(header, fields))
            if (not line.endswith("\n") or len(fields) != len(header)
                    or any(row.get(key) in (None, "") for key in REQUIRED_COLUMNS)
                    or not row["image"].endswith(".png")):
                torn += line.strip() != ""
                continue
            rows[(row["pair"], row["policy"], int(row["seed"]))] = row
        if torn and problems is not None:
            problems.append(f"{path}: {torn} torn line(s) skipped (their images are made again by a rerun)")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _policy_table(rows: dict, policies: list[str], cell) -> list[str]:
    """One line per method with rows: ``cell(values in percent)`` per metric, then the image count."""
    metrics = _metrics(rows)
    lines = ["| method | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " | images |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for policy in policies:
        picked = [row for row in rows.values() if row["policy"] == policy]
        if picked:
            cells = [cell([100 * float(row[metric]) for row in picked]) for metric in metrics]
            lines.append(f"| {policy} | " + " | ".join(cells) + f" | {len(picked)} |")
    return lines


def scores_table(rows: dict, policies: list[str]) -> list[str]:
    """The paper's Table 1 layout: one line per method, mean ± std (sample std) in percent; the extra
    metrics get a column when every row has them."""
    return _policy_table(rows, policies, lambda values: "{:.1f} ± {:.1f}".format(*_mean_std(values)))


def _metrics(rows: dict) -> list[str]:
    extra = [m for m in EXTRA_METRICS if rows and all(row.get(m) not in (None, "") for row in rows.values())]
    return [*METRICS, *extra]


def ci_table(rows: dict, policies: list[str]) -> list[str]:
    """One line per method: mean [low, high], the percentile-bootstrap 95% interval of the mean, in percent."""
    from ..scoring.stats import bootstrap_ci

    return _policy_table(rows, policies, lambda values: "{:.1f} [{:.1f}, {:.1f}]".format(*bootstrap_ci(values)))


def paired_table(rows: dict, policies: list[str], baseline: str = BASELINE) -> list[str]:
    """One line per method: its score minus ``baseline``'s on the same (pair, seed), mean [low, high] in points;
    ``*`` marks an interval that excludes zero."""
    from ..scoring.stats import excludes_zero, paired_difference_ci

    metrics = _metrics(rows)
    base = {(key[0], key[2]): row for key, row in rows.items() if row["policy"] == baseline}
    lines = ["| method − direct | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " | pairs |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for policy in policies:
        if policy == baseline:
            continue
        matched = [(row, base[(key[0], key[2])]) for key, row in rows.items()
                   if row["policy"] == policy and (key[0], key[2]) in base]
        if not matched:
            continue
        cells = []
        for metric in metrics:
            ci = paired_difference_ci([100 * float(a[metric]) for a, _ in matched],
                                      [100 * float(b[metric]) for _, b in matched])
            star = "*" if excludes_zero(ci) else ""
            cells.append(f"{ci[0]:+.1f} [{ci[1]:+.1f}, {ci[2]:+.1f}]{star}")
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {len(matched)} |")
    return lines


def cost_table(rows: dict, policies: list[str]) -> list[str]:
    lines = ["| method | wall s / image (mean ± std) | total wall s | peak memory MB (max) | memory measured as |",
             "|---|---|---|---|---|"]
    for policy in policies:
        picked = [row for row in rows.values() if row["policy"] == policy]
        if not picked:
            continue
        walls = [float(row["wall_s"]) for row in picked]
        mean, std = _mean_std(walls)
        peak = max(float(row["peak_mem_mb"]) for row in picked)
        kinds = ", ".join(sorted({row["mem_kind"] for row in picked}))
        lines.append(f"| {policy} | {mean:.2f} ± {std:.2f} | {sum(walls):.1f} | {peak:.0f} | {kinds} |")
    return lines


def write_report(out: Path, rows: dict, policies: list[str], planned: int, notes: list[str],
                 problems: list[str] = ()) -> Path:
    """out/report.md: the scores table (comparable across runs and shardings), the cost table, then what the
    CSV reader skipped. One section per concern: a new section is a new list of lines appended here."""
    missing = planned - len(rows)
    scored = f"- images scored: {len(rows)} of {planned} planned" + (f" (**{missing} missing**)" if missing else "")
    lines = ["# fusion-engine eval", "", *[f"- {note}" for note in notes], scored,
             "", SCORES_HEADING, "", *scores_table(rows, policies), "",
             CI_HEADING, "", *ci_table(rows, policies), "",
             PAIRED_HEADING, "", *paired_table(rows, policies), "",
             "## Cost (per image, generation only; the +llr rows include making the two references)", "",
             *cost_table(rows, policies), ""]
    if problems:
        lines += ["## Skipped records (torn by a crash; rerun to make their images again)", "",
                  *[f"- {problem}" for problem in problems], ""]
    return write_text(Path(out) / "report.md", "\n".join(lines))
