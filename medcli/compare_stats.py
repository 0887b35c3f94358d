"""What a comparison's claims are measured against: the best setup among its rivals on the same
data, paired tests between two setups evaluated on the same images, and the published MedMNIST
v2 numbers (`aggregate`'s stars, `--pair`, `--reference`).

Leaders. A setup is best on a metric only among the setups on the same data (dataset, image
size and provenance): scores on other data are not comparable, and a setup alone on its data
is best at nothing.

Paired tests. Two runs evaluated on the same test images (the same dataset file by md5, and the
same images and labels in the same order in their predictions CSVs) are compared image by
image: McNemar's exact test on the images each gets right (accuracy), and a paired bootstrap of
the AUC difference (both models scored on the same resamples; BOOTSTRAP_RESAMPLES resamples
seeded with BOOTSTRAP_SEED, both recorded). Setups repeated over seeds are paired by seed, and
each metric's per-seed differences give a mean difference with a Student-t interval. A test
that cannot be made says why, in one line, instead of a number.

Published numbers. `data/medmnist_v2_benchmarks.csv` is Table 3 of the MedMNIST v2 paper (test
AUC and ACC of seven methods on the twelve 2D datasets, all trained and tested on the official
28-px images; "(224)" means those images resized to 224 px), transcribed from the MedMNIST
team's page medmnist.com/v2. `references` gives the rows of the compared datasets, marked as
different data where a run did not use the official 28-px file.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medcli import metrics, tables
from medcli.errors import UsageError
from medcli.names import LOWER_IS_BETTER, PERCENT_METRICS
from medcli.run import Run

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "CITATION", "benchmarks", "data_key", "leaders", "pair_groups",
           "p_text", "paired_lines", "paired_rows", "paired_tests", "references"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BENCHMARKS_FILE = "medmnist_v2_benchmarks.csv"
CITATION = ("Yang et al., MedMNIST v2, Scientific Data 10:41 (2023), Table 3: test set, official 28-px images "
            "(medmnist.com/v2)")
PUBLISHED_SIZE = 28
PUBLISHED_METRICS = {"acc": "accuracy", "auc": "auc"}  # the file's columns -> medcli's metric names


# ---------------------------------------------------------------------------------------
# Leaders
# ---------------------------------------------------------------------------------------


def data_key(group: dict) -> tuple:
    """What a setup (or run) was tested on: dataset, size, provenance and the evaluated file's
    md5 (two unofficial files of one flag are different test sets)."""
    return group["dataset"], group["size"], group["data"], group["experiment"].get("evaluated_md5")


def leaders(groups: list[dict], metric_names: Sequence[str]) -> dict[str, list[str]]:
    """Per metric, the labels of the group(s) (`aggregate`'s setups) with the best mean (lower
    is better for losses and ECE) among two or more on the same data, at the precision the
    table shows (`metrics.shown_value`: two means that read 91.23 % both lead); a score that names its
    method (`<metric>_method`: `road`, each run's own explanation method) only among scores of
    that method."""
    by_data: dict[tuple, list[dict]] = {}
    for g in groups:
        by_data.setdefault(data_key(g), []).append(g)
    found: dict[str, list[str]] = {}
    for metric in metric_names:
        for same_data in by_data.values():
            contests: dict[Any, list[dict]] = {}
            for g in same_data:
                contests.setdefault(g.get(f"{metric}_method"), []).append(g)
            for rivals in contests.values():
                scored = [(metrics.shown_value(metric, g[metric]), g["group"]) for g in rivals if g[metric] is not None]
                if len(scored) > 1:
                    best = (min if metric in LOWER_IS_BETTER else max)(value for value, _ in scored)
                    found.setdefault(metric, []).extend(
                        name for value, name in scored if value == best)
    return found


# ---------------------------------------------------------------------------------------
# Paired tests
# ---------------------------------------------------------------------------------------


def pair_groups(groups: list[dict], pair: Sequence[str] | None) -> tuple[dict, dict] | None:
    """The two setups (groups of `aggregate`) a paired test compares: the ones `pair` names (each
    by its label, one of its run ids or run directories), else the only two when exactly two
    are compared on the same data; None when there is no pair."""
    if not pair:
        return (groups[0], groups[1]) if len(groups) == 2 and data_key(groups[0]) == data_key(groups[1]) else None
    a, b = (_named_group(groups, name) for name in pair)
    if a is b:
        raise UsageError(f"--pair names the setup '{a['group']}' twice; name two different setups")
    if a["dataset"] != b["dataset"]:  # a t-test over seeds of two datasets' accuracies tests nothing
        raise UsageError(f"--pair compares setups on one dataset, not {a['dataset']} with {b['dataset']}")
    return a, b


def _named_group(groups: list[dict], name: str) -> dict:
    path = Path(name).resolve()
    found = [g for g in groups if g["group"] == name or name in g["runs"]
             or any(Path(p).resolve() == path for p in g["paths"])]
    if len(found) != 1:
        raise UsageError(f"--pair '{name}' names {'no' if not found else 'more than one'} compared setup; name a run "
                         f"directory, a run id or one of: {', '.join(repr(g['group']) for g in groups)}")
    return found[0]


def paired_tests(a: dict, b: dict, runs: list[dict], split: str, metric_names: Sequence[str]) -> dict:
    """Setup `a` against setup `b` on `split`: per pair of runs (the same seed; or the two runs
    when each setup has one), McNemar and the AUC bootstrap on the same images; over two or
    more seed pairs, each metric's mean difference A - B with its t-interval."""
    members = [[r for r in runs if r["path"] in g["paths"]] for g in (a, b)]  # run ids need not be unique
    repeated: list = []
    if len(members[0]) == 1 == len(members[1]):
        pairs = [(members[0][0], members[1][0])]
    else:  # one run per seed and setup: a seed run twice (or unknown) by either has no pair
        counts = [Counter(r["seed"] for r in group) for group in members]
        repeated = sorted({seed for count in counts for seed, n in count.items() if n > 1 or seed is None}, key=str)
        by_seed = {r["seed"]: r for r in members[1] if r["seed"] not in repeated}
        pairs = [(r, by_seed[r["seed"]]) for r in members[0] if r["seed"] in by_seed]
    result = {"a": a["group"], "b": b["group"], "split": split,
              "pairs": [_image_tests(ra, rb, split) for ra, rb in pairs]}
    if repeated:
        result["repeated_seeds"] = repeated
    if len(members[0]) > 1 or len(members[1]) > 1:
        result["across_seeds"] = _across_seeds(pairs, metric_names)
    result["tests"] = _holm(result)
    return result


def _holm(result: dict) -> int:
    """Holm's step-down adjustment over every p-value of a comparison (the family-wise error
    of all the tests shown), stored beside each as `p_holm`; returns the number of tests."""
    across = result.get("across_seeds") or {}
    tests = [test for entry in result["pairs"] if "refused" not in entry for test in (entry["accuracy"], entry["auc"])]
    tests += [found for key, found in across.items() if key != "seeds" and isinstance(found, dict)]
    tests = [test for test in tests if test.get("p_value") is not None]
    adjusted = 0.0
    for rank, test in enumerate(sorted(tests, key=lambda test: test["p_value"])):
        adjusted = max(adjusted, min(1.0, (len(tests) - rank) * test["p_value"]))
        test["p_holm"] = adjusted
    return len(tests)


def _image_tests(ra: dict, rb: dict, split: str) -> dict:
    entry = {"run_a": ra["run"], "run_b": rb["run"], "seed_a": ra["seed"], "seed_b": rb["seed"]}
    try:
        task, labels, probs_a, probs_b = _same_images(ra, rb, split)
    except UsageError as exc:
        return {**entry, "refused": str(exc)}
    entry["n"] = int(len(labels))
    correct = [task.image_accuracy(labels, probs) for probs in (probs_a, probs_b)]
    if all(np.isin(c, (0.0, 1.0)).all() for c in correct):
        entry["accuracy"] = metrics.mcnemar_exact(*correct)
    else:
        entry["accuracy"] = {"refused": "accuracy is each image's share of labels right here; McNemar needs one "
                                        "right or wrong decision per image"}
    columns = task.auc_columns()
    entry["auc"] = metrics.paired_bootstrap_auc(task.indicator(labels)[:, columns], probs_a[:, columns],
                                                probs_b[:, columns], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    return entry


def _predictions(run: Run, split: str):
    """A run's predictions of `split` (`tables.read_predictions`), the file checked first against
    the sha256 evaluate recorded (an edited or copied-in CSV is not this run's): the bytes
    hashed are the bytes parsed."""
    path = run.predictions_file(split)
    checked = run.read_evaluated(path, split) if path.is_file() else None  # a missing one is read_predictions' to name
    return tables.read_predictions(path, checked)


def _same_images(ra: dict, rb: dict, split: str):
    """(task, labels, probabilities of A, of B) from the two runs' predictions CSVs of `split`;
    a one-line UsageError unless both saw the same images: the same dataset file (md5) and the
    same image indices and labels in the same order."""
    md5 = [r["experiment"].get("evaluated_md5") for r in (ra, rb)]  # the files the split was scored on
    if md5[0] is None or md5[0] != md5[1]:
        raise UsageError(f"not the same test images: {ra['run']} and {rb['run']} were evaluated on different files "
                         f"(md5 {md5[0]} vs {md5[1]})")
    (frame_a, task), (frame_b, task_b) = (_predictions(Run.open(r["path"]), split) for r in (ra, rb))
    labels, labels_b = task.csv_decisions(frame_a)[0], task_b.csv_decisions(frame_b)[0]
    if task != task_b or labels.shape != labels_b.shape or not np.array_equal(labels, labels_b) \
            or not np.array_equal(frame_a["index"], frame_b["index"]):
        raise UsageError(f"not the same test images: the {split} predictions of {ra['run']} and {rb['run']} differ "
                         f"in their images, labels or classes; re-run 'medcli evaluate' on both")
    return task, labels, tables.frame_arrays(frame_a, task)[1], tables.frame_arrays(frame_b, task)[1]


def _across_seeds(pairs: list[tuple[dict, dict]], metric_names: Sequence[str]) -> dict:
    """Per metric, the mean difference A - B over the seed pairs (t-interval), or why not."""
    if len(pairs) < 2:
        return {"refused": f"a t-interval needs two or more seeds run by both setups; {len(pairs)} in common"}
    result = {"seeds": [ra["seed"] for ra, _ in pairs]}
    for metric in metric_names:
        methods = {run.get(f"{metric}_method") for pair in pairs for run in pair} - {None}
        if len(methods) > 1:  # `road`: each run's own explanation method; two methods' faithfulness is no contest
            result[metric] = {"refused": f"the setups' scores are of different methods ({', '.join(sorted(methods))})"}
            continue
        differences = [ra[metric] - rb[metric] for ra, rb in pairs if ra[metric] is not None and rb[metric] is not None]
        result[metric] = (metrics.mean_difference(differences) if len(differences) > 1
                          else {"refused": "not every run of the pairs has it"})
    return result


def paired_lines(paired: dict) -> list[str]:
    """The paired tests in words, one line per finding (for the table and the Markdown file)."""
    count = paired.get("tests", 0)
    lines = [f"Paired tests, A = {paired['a']} vs B = {paired['b']} ({paired['split']} split"
             + (f"; Holm-adjusted p over the {count} tests shown" if count > 1 else "") + "):"]
    if paired.get("repeated_seeds"):
        lines.append(f"  seed {', '.join(map(str, paired['repeated_seeds']))} left out: a setup holds more than one "
                     "run of it (pairing needs one run per seed and setup)")
    for entry in paired["pairs"]:
        head = f"  seed {entry['seed_a']} vs {entry['seed_b']}"
        if "refused" in entry:
            lines.append(f"{head}: no test, {entry['refused']}")
            continue
        lines.append(f"{head}, the same {entry['n']} images:")
        accuracy, auc = entry["accuracy"], entry["auc"]
        if "refused" in accuracy:
            lines.append(f"    accuracy: no McNemar test, {accuracy['refused']}")
        else:
            lines.append(f"    accuracy {accuracy['accuracy_a']:.2%} vs {accuracy['accuracy_b']:.2%}: McNemar exact "
                         f"{_p(accuracy)} (right only by A: {accuracy['only_a']}, only by B: "
                         f"{accuracy['only_b']})")
        if auc["difference"] is None:
            lines.append("    AUC: undefined on these images (a class without positives or negatives)")
        else:
            interval = ("no interval (too few resamples)" if auc["interval"] is None else
                        f"{auc['level']:.0%} CI {auc['interval'][0]:+.4f} to {auc['interval'][1]:+.4f}")
            lines.append(f"    AUC {auc['auc_a']:.4f} vs {auc['auc_b']:.4f}: A - B {auc['difference']:+.4f}, "
                         f"{interval}, paired bootstrap {_p(auc)} "
                         f"({auc['used']} of {auc['resamples']} resamples, seed {auc['seed']})")
    across = paired.get("across_seeds")
    if across is not None and "refused" in across:
        lines.append(f"  across seeds: no interval, {across['refused']}")
    elif across is not None:
        lines.append(f"  across seeds {', '.join(map(str, across['seeds']))} (paired by seed), A - B:")
        for metric, found in across.items():
            if metric == "seeds":
                continue
            if "refused" in found:
                lines.append(f"    {metric}: {found['refused']}")
                continue
            interval = ("no t-interval (the differences do not vary)" if found["interval"] is None else
                        f"{found['level']:.0%} t-interval {_difference(metric, found['interval'][0])} to "
                        f"{_difference(metric, found['interval'][1])}")
            lines.append(f"    {metric} {_difference(metric, found['mean'])}, {interval}, paired t ({found['n'] - 1} df) "
                         f"{_p(found)}")
    return lines


def paired_rows(paired: dict) -> list[dict]:
    """The paired tests as table rows (the workbook's sheet): one per test, with the values
    compared, the difference and its interval, p and Holm-adjusted p, or why there is no test."""
    blank = dict.fromkeys(("a", "b", "difference", "ci_low", "ci_high", "p", "p_holm"))

    def p_values(test: dict) -> dict:
        return {"p": test["p_value"], "p_holm": test.get("p_holm", test["p_value"])}

    def interval(test: dict) -> dict:
        return dict(zip(("ci_low", "ci_high"), test["interval"] or (None, None)))

    rows = []
    for entry in paired["pairs"]:
        where = {"seeds": f"{entry['seed_a']} vs {entry['seed_b']}", "images": entry.get("n")}
        if "refused" in entry:
            rows.append({**where, "test": "-", "metric": "-", **blank, "note": entry["refused"]})
            continue
        accuracy, auc = entry["accuracy"], entry["auc"]
        rows.append({**where, "test": "McNemar exact", "metric": "accuracy", **blank,
                     **({"note": accuracy["refused"]} if "refused" in accuracy else {
                         "a": accuracy["accuracy_a"], "b": accuracy["accuracy_b"],
                         "difference": accuracy["accuracy_a"] - accuracy["accuracy_b"], **p_values(accuracy),
                         "note": f"right only by A: {accuracy['only_a']}, only by B: {accuracy['only_b']}"})})
        rows.append({**where, "test": "paired bootstrap", "metric": "auc", **blank,
                     **({"note": "undefined on these images"} if auc["difference"] is None else {
                         "a": auc["auc_a"], "b": auc["auc_b"], "difference": auc["difference"], **interval(auc),
                         **p_values(auc), "note": f"{auc['used']} of {auc['resamples']} resamples, seed {auc['seed']}"})})
    across = paired.get("across_seeds") or {}
    for metric, found in across.items():
        if metric in ("seeds", "refused"):
            continue
        where = {"seeds": ", ".join(map(str, across["seeds"])), "images": None}
        rows.append({**where, "test": "paired t over seeds", "metric": metric, **blank,
                     **({"note": found["refused"]} if "refused" in found else {
                         "difference": found["mean"], **interval(found), **p_values(found), "note": ""})})
    if "refused" in across:
        rows.append({"seeds": "-", "images": None, "test": "paired t over seeds", "metric": "-", **blank,
                     "note": across["refused"]})
    return rows


def p_text(p: float) -> str:
    """A p-value to three significant digits, cut (not rounded) so that it never crosses a
    threshold such as 0.05 or 0.01 (0.0496 stays "0.0496", 0.04999 reads "0.0499", never
    "0.05"); "< 0.0001" below that."""
    if p < 1e-4:
        return "< 0.0001"
    digits = 2 - int(np.floor(np.log10(p)))
    return f"{np.floor(round(p * 10 ** digits, 6)) / 10 ** digits:.{digits}f}".rstrip("0").rstrip(".")


def _p(test: dict) -> str:
    """A test's p-value (`p_text`; "p ≤" where a bootstrap found no resample against it: its
    least p), and its Holm-adjusted one where several tests are shown."""
    if test["p_value"] is None:
        return "p undefined"
    floor = test.get("test") == "paired bootstrap" and test["p_value"] <= 2 / (test["used"] + 1)
    text = p_text(test["p_value"])
    holm = p_text(test.get("p_holm", test["p_value"]))
    bound = "" if text.startswith("<") else "\u2264 " if floor else "= "  # a bound's Holm value is one too
    return f"p {bound}{text}" + (f" (Holm {'' if holm.startswith('<') else bound.replace('= ', '')}{holm})"
                                 if holm != text else "")


def _difference(metric: str, value: float) -> str:
    return f"{value * 100:+.2f} points" if metric in PERCENT_METRICS else f"{value:+.4f}"


# ---------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------


@cache
def benchmarks() -> dict[str, list[dict]]:
    """The MedMNIST v2 table by dataset flag: [{"method", "accuracy", "auc"}, ...] in the paper's order."""
    text = resources.files("medcli").joinpath("data").joinpath(BENCHMARKS_FILE).read_text(encoding="utf-8")
    table: dict[str, list[dict]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        table.setdefault(row["flag"], []).append(
            {"method": row["method"], **{name: float(row[column]) for column, name in PUBLISHED_METRICS.items()}})
    return table


def references(runs: list[dict]) -> list[dict]:
    """The published rows of every MedMNIST 2D dataset among `runs` (their "dataset" flag, "size"
    and "data": the provenance, empty for the official file), each with the citation and, where
    some run used other data than the official 28-px file, what differs."""
    rows = []
    for flag in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == flag]
        differs = sorted({f"{r['size']} px" for r in mine if r["size"] != PUBLISHED_SIZE}
                         | {r["data"] for r in mine if r["data"]})
        rows += [{"dataset": flag, "size": PUBLISHED_SIZE, **published, "source": CITATION,
                  "different_data": ", ".join(differs) or None} for published in benchmarks().get(flag, [])]
    return rows
