"""What `aggregate` judges a comparison by: McNemar's exact test against a hand-computed case,
the paired AUC bootstrap (seeded, deterministic), the t-interval over seeds, paired tests
between runs on the same images (and refusals when they are not), and the published MedMNIST
v2 table checked against the paper."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from typer.testing import CliRunner

from medcli import compare_stats, metrics, tables, tasks, webpage
from medcli.aggregate import aggregate, table_text, to_csv, write_chart, write_xlsx
from medcli.cli import app
from medcli.run import Run

from cli_helpers import one_line_error
from test_aggregate import make_run

runner = CliRunner()
TASK = tasks.for_kind("multi-class", ["basophil", "eosinophil", "neutrophil"])


def test_mcnemar_exact_against_a_hand_computed_case():
    # 5 images both right, 3 both wrong, 1 right only by A, 9 right only by B:
    # p = 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 2 * (1 + 10) / 1024
    a = np.array([1] * 5 + [0] * 3 + [1] * 1 + [0] * 9, dtype=bool)
    b = np.array([1] * 5 + [0] * 3 + [0] * 1 + [1] * 9, dtype=bool)
    found = metrics.mcnemar_exact(a, b)
    assert (found["only_a"], found["only_b"], found["n"]) == (1, 9, 18)
    assert found["p_value"] == pytest.approx(22 / 1024)
    assert found["accuracy_a"] == pytest.approx(6 / 18) and found["accuracy_b"] == pytest.approx(14 / 18)
    assert metrics.mcnemar_exact(a, a)["p_value"] == 1.0  # no discordant image: no evidence of a difference


def test_paired_bootstrap_is_seeded_and_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    positive = rng.random((300, 2)) < 0.4
    good = positive + rng.normal(0, 0.6, size=positive.shape)
    poor = positive + rng.normal(0, 1.5, size=positive.shape)
    first = metrics.paired_bootstrap_auc(positive, good, poor, resamples=300, seed=7)
    assert first == metrics.paired_bootstrap_auc(positive, good, poor, resamples=300, seed=7)
    assert first["interval"] != metrics.paired_bootstrap_auc(positive, good, poor, resamples=300, seed=8)["interval"]
    for key, scores in (("auc_a", good), ("auc_b", poor)):
        assert first[key] == pytest.approx(np.mean([roc_auc_score(positive[:, k], scores[:, k]) for k in range(2)]))
    assert first["difference"] == pytest.approx(first["auc_a"] - first["auc_b"])
    assert first["difference"] > 0 and first["interval"][0] > 0 and first["p_value"] < 0.01
    assert (first["resamples"], first["seed"], first["used"]) == (300, 7, 300)
    same = metrics.paired_bootstrap_auc(positive, good, good, resamples=100, seed=0)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_mean_difference_t_interval():
    from scipy import stats

    found = metrics.mean_difference([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # std 1, n 3
    assert found["mean"] == 2.0 and found["interval"] == pytest.approx([2 - half, 2 + half])
    assert found["p_value"] == pytest.approx(stats.ttest_1samp([1.0, 2.0, 3.0], 0).pvalue)
    with pytest.raises(ValueError):
        metrics.mean_difference([1.0])


def predicted(run: Path, right: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write the run's test predictions: confident in the label where `right`, else in the next class."""
    labels = np.arange(right.size) % 3 if labels is None else labels
    decided = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((right.size, 3), 0.1)
    probs[np.arange(right.size), decided] = 0.8
    tables.write_predictions(Run.open(run).predictions_file("test"), TASK, labels, probs)


# A right on 30 of 40 images, B on 22: 20 both, 10 only A, 2 only B, 8 neither.
RIGHT_A = np.array([1] * 20 + [1] * 10 + [0] * 2 + [0] * 8, dtype=bool)
RIGHT_B = np.array([1] * 20 + [0] * 10 + [1] * 2 + [0] * 8, dtype=bool)


def _cnn_vs_vit(tmp_path):
    """A CNN run and a ViT run on the same 40 test images (RIGHT_A, RIGHT_B), aggregated: the
    result and its one pair of runs."""
    cnn = make_run(tmp_path, "cnn", accuracy=0.75)
    vit = make_run(tmp_path, "vit", model="vit-tiny", accuracy=0.55)
    predicted(cnn, RIGHT_A)
    predicted(vit, RIGHT_B)
    result = aggregate([tmp_path], metric_names=["accuracy", "auc"])
    (pair,) = result.paired["pairs"]
    return result, pair


def test_two_runs_on_the_same_images_get_paired_tests(tmp_path):
    result, pair = _cnn_vs_vit(tmp_path)
    assert pair["n"] == 40
    assert (pair["accuracy"]["only_a"], pair["accuracy"]["only_b"]) == (10, 2)
    assert pair["accuracy"]["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 * P(X <= 2), X ~ B(12, 1/2)
    assert (pair["auc"]["resamples"], pair["auc"]["seed"]) == (compare_stats.BOOTSTRAP_RESAMPLES,
                                                               compare_stats.BOOTSTRAP_SEED)
    assert pair["auc"] == aggregate([tmp_path], metric_names=["accuracy", "auc"]).paired["pairs"][0]["auc"]
    text = table_text(result, width=100)
    assert "McNemar exact p = 0.0385" in text and "paired bootstrap" in text
    # review: the workbook had no paired tests (only the table, Markdown, JSON and page did)
    sheet = load_workbook(write_xlsx(tmp_path / "c.xlsx", result))["paired tests"]
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0][0].startswith("A = resnet18 s0 vs B = vit-tiny s0")
    header = list(rows[1])
    found = {(row[header.index("test")], row[header.index("metric")]): dict(zip(header, row)) for row in rows[2:]}
    mcnemar = found[("McNemar exact", "accuracy")]
    assert mcnemar["p"] == pytest.approx(pair["accuracy"]["p_value"]) and mcnemar["a"] == pytest.approx(0.75)
    bootstrap = found[("paired bootstrap", "auc")]
    assert (bootstrap["ci_low"], bootstrap["ci_high"]) == pytest.approx(tuple(pair["auc"]["interval"]))


@pytest.mark.parametrize("change", ["md5", "labels"])
def test_paired_tests_refuse_different_images(tmp_path, change):
    cnn = make_run(tmp_path, "cnn")
    vit = make_run(tmp_path, "vit", model="vit-tiny", dataset={"md5": "other"} if change == "md5" else None)
    predicted(cnn, RIGHT_A)
    predicted(vit, RIGHT_B, labels=(np.arange(40) + (change == "labels")) % 3)
    if change == "md5":  # review: two setups on different files are no default pair
        assert aggregate([tmp_path], metric_names=["accuracy"]).paired is None
    result = aggregate([tmp_path], metric_names=["accuracy"], pair=("cnn", "vit"))
    (pair,) = result.paired["pairs"]
    assert pair["refused"].startswith("not the same test images") and "accuracy" not in pair
    (row,) = [row for row in compare_stats.paired_rows(result.paired) if row["test"] == "-"]
    assert row["note"] == pair["refused"]
    write_xlsx(tmp_path / "c.xlsx", result)  # a refused pair is a row too


def test_seeds_give_a_mean_difference_with_a_t_interval(tmp_path):
    for seed, (a, b) in enumerate([(0.90, 0.80), (0.92, 0.84)]):
        make_run(tmp_path, f"cnn{seed}", seed=seed, accuracy=a)
        make_run(tmp_path, f"vit{seed}", model="vit-tiny", seed=seed, accuracy=b)
    paired = aggregate([tmp_path], metric_names=["accuracy"]).paired
    across = paired["across_seeds"]
    assert across["seeds"] == [0, 1] and across["accuracy"]["mean"] == pytest.approx(0.09)
    (over_seeds,) = [row for row in compare_stats.paired_rows(paired)
                     if row["test"] == "paired t over seeds" and row["metric"] == "accuracy"]
    assert over_seeds["difference"] == pytest.approx(0.09) and over_seeds["seeds"] == "0, 1"
    assert across["accuracy"]["n"] == 2 and across["accuracy"]["interval"][0] < 0.09 < across["accuracy"]["interval"][1]
    assert all("no predictions file" in pair["refused"] for pair in paired["pairs"])  # said, not silently skipped
    # review: two seeds' interval ran from -95.82 to +231.76 points, unexplained: the line says its df
    assert any(line.strip().startswith("accuracy +9.00 points, 95% t-interval") and "paired t (1 df) p = " in line
               for line in compare_stats.paired_lines(paired))


def test_pair_chooses_two_of_several_setups(tmp_path):
    runs = [make_run(tmp_path, name, model=model) for name, model in
            (("cnn", "resnet18"), ("vit", "vit-tiny"), ("dense", "densenet121"))]
    assert aggregate([tmp_path], metric_names=["accuracy"]).paired is None  # three setups: nothing automatic
    shown = runner.invoke(app, ["aggregate", str(tmp_path), "--pair", str(runs[0]), "vit", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    paired = json.loads(shown.stdout)["paired"]
    assert (paired["a"], paired["b"]) == ("resnet18 s0", "vit-tiny s0")
    # review: --json, as every other command spells it, was "No such option"
    as_json = runner.invoke(app, ["aggregate", str(tmp_path), "--pair", str(runs[0]), "vit", "--json"])
    assert json.loads(as_json.stdout)["paired"] == paired
    one_line_error(runner.invoke(app, ["aggregate", str(tmp_path), "--json", "--format", "csv"]), 2,
                   "--json prints JSON and --format csv a csv; give one of them")
    bad = runner.invoke(app, ["aggregate", str(tmp_path), "--pair", "cnn", "alexnet"])
    assert bad.exit_code == 2 and "--pair 'alexnet' names no compared setup" in bad.stderr


def test_pair_refuses_setups_on_different_datasets(tmp_path):
    """Review: --pair of a BloodMNIST and a ChestMNIST setup refused the per-image tests but
    still gave a "paired by seed" t-test of their accuracies (p = 0.026)."""
    for seed, (a, b) in enumerate([(0.90, 0.60), (0.92, 0.61)]):
        make_run(tmp_path, f"blood{seed}", seed=seed, accuracy=a)
        make_run(tmp_path, f"chest{seed}", seed=seed, accuracy=b, dataset={"flag": "chestmnist", "md5": "def"})
    result = runner.invoke(app, ["aggregate", str(tmp_path), "--pair", "blood0", "chest0", "--metrics", "accuracy"])
    assert "--pair compares setups on one dataset, not bloodmnist with chestmnist" in one_line_error(result, 2)
    sizes = tmp_path / "sizes"  # one dataset at two sizes: a comparison a user may want, paired by seed
    for seed in (0, 1):
        make_run(sizes, f"s28-{seed}", seed=seed, accuracy=0.9 + seed / 100)
        make_run(sizes, f"s64-{seed}", seed=seed, accuracy=0.8, dataset={"size": 64, "md5": "def"})
    across = aggregate([sizes], metric_names=["accuracy"], pair=("s28-0", "s64-0")).paired["across_seeds"]
    assert across["accuracy"]["mean"] == pytest.approx(0.105)


def test_published_table_matches_the_paper():
    """MedMNIST v2 (Yang et al., Sci Data 2023), Table 3: a few cells read off the paper."""
    table = compare_stats.benchmarks()
    assert len(table) == 12 and all(len(rows) == 7 for rows in table.values())

    def cell(flag: str, method: str) -> tuple[float, float]:
        row = next(r for r in table[flag] if r["method"] == method)
        return row["auc"], row["accuracy"]

    assert cell("bloodmnist", "ResNet-18 (28)") == (0.998, 0.958)
    assert cell("breastmnist", "ResNet-18 (28)") == (0.901, 0.863)
    assert cell("retinamnist", "ResNet-18 (28)") == (0.717, 0.524)
    assert cell("pneumoniamnist", "Google AutoML Vision") == (0.991, 0.946)
    assert cell("chestmnist", "auto-sklearn") == (0.649, 0.779)


@pytest.mark.parametrize("dataset, different", [(None, None), ({"synthetic": True}, "synthetic"),
                                                ({"size": 64}, "64 px")])
def test_reference_adds_the_published_rows(tmp_path, dataset, different):
    make_run(tmp_path, "cnn", dataset=dataset)
    result = aggregate([tmp_path], metric_names=["accuracy", "auc", "ece"], reference=True)
    assert len(result.references) == 7 and {r["different_data"] for r in result.references} == {different}
    text = table_text(result, width=100)
    assert "ResNet-18 (28) published" in text and "95.80%" in text and "Yang et al." in text
    assert ("different data" in text) == (different is not None)
    # review: the published rows were in the table and comparison.md only, not in the CSV or workbook
    frame = pd.read_csv(io.StringIO(to_csv(result)))
    published = frame[frame["source"] == compare_stats.CITATION].set_index("group")
    assert len(published) == 7 and published.loc["ResNet-18 (28) published", "accuracy"] == pytest.approx(0.958)
    assert list(frame["source"]) == ["medcli runs"] + [compare_stats.CITATION] * 7
    book = load_workbook(write_xlsx(tmp_path / "c.xlsx", result))
    assert book["comparison"].max_row == 1 + 1 + 7
    assert aggregate([tmp_path], metric_names=["accuracy"]).references == []


def test_a_seed_run_twice_by_a_setup_is_left_out_of_the_pairs(tmp_path):
    """Review: the second run of a repeated seed replaced the first on B's side and was paired
    with both of A's: three pairs, one degree of freedom too many, "significant" at 0.0496."""
    for name, seed, accuracy in (("a0", 0, 0.90), ("a0b", 0, 0.92), ("a1", 1, 0.91), ("a2", 2, 0.93)):
        make_run(tmp_path, name, seed=seed, accuracy=accuracy)
    for name, seed, accuracy in (("b0", 0, 0.85), ("b1", 1, 0.86), ("b2", 2, 0.84)):
        make_run(tmp_path, name, model="vit-tiny", seed=seed, accuracy=accuracy)
    result = aggregate([tmp_path], metric_names=["accuracy"])
    paired = result.paired
    assert paired["repeated_seeds"] == [0] and paired["across_seeds"]["seeds"] == [1, 2]
    assert paired["across_seeds"]["accuracy"]["n"] == 2
    assert "seed 0 left out" in table_text(result, width=120)


def test_p_values_say_what_the_resamples_can_resolve_and_are_adjusted_for_the_tests_shown(tmp_path):
    """Review: every resampled AUC difference of one sign gave p = 0 ("p < 0.0001") from 2,000
    resamples, and 11 raw p-values were printed for 3 seeds x 5 metrics without adjustment."""
    rng = np.random.default_rng(1)
    positive = rng.random((300, 1)) < 0.5
    found = metrics.paired_bootstrap_auc(positive, positive + rng.normal(0, 0.3, positive.shape),
                                         positive + rng.normal(0, 3.0, positive.shape), resamples=2000, seed=0)
    assert found["p_value"] == pytest.approx(2 / 2001)  # (1 + 0) / (2000 + 1) per tail, two-sided
    assert metrics.mean_difference([0.05, 0.05])["p_value"] is None  # no variation between seeds: no t-test
    result, pair = _cnn_vs_vit(tmp_path)
    raw = sorted([pair["accuracy"]["p_value"], pair["auc"]["p_value"]])
    holm = sorted([pair["accuracy"]["p_holm"], pair["auc"]["p_holm"]])
    assert holm == [min(1, 2 * raw[0]), max(min(1, 2 * raw[0]), raw[1])]
    text = table_text(result, width=120)
    assert "Holm" in text and "2 tests" in text


def test_runs_of_the_same_id_in_two_folders_keep_their_own_setups(tmp_path):
    """Review: two runs started in the same second share a run id; the pairing and the page's
    Runs table looked runs up by id, so each setup "held both" (no paired test) and the page
    gave the first run the second's setup."""
    cnn = make_run(tmp_path / "a", "same-id", accuracy=0.75, checkpoint_sha256="a" * 64)
    vit = make_run(tmp_path / "b", "same-id", model="vit-tiny", accuracy=0.55,
                   checkpoint_sha256="b" * 64)
    predicted(cnn, RIGHT_A)
    predicted(vit, RIGHT_B)
    result = aggregate([cnn, vit], metric_names=["accuracy", "auc"])
    (pair,) = result.paired["pairs"]
    assert "repeated_seeds" not in result.paired and pair["n"] == 40
    assert (pair["accuracy"]["only_a"], pair["accuracy"]["only_b"]) == (10, 2)
    page = webpage.comparison_page(result, write_chart(tmp_path / "chart.png", result), "none")
    rows = re.findall(r"<tr><td>same-id</td><td>([^<]*)</td>.*?<td>([^<]*)</td></tr>", page.replace("<wbr>", ""))
    assert sorted(rows) == sorted([("resnet18 s0", str(cnn)), ("vit-tiny s0", str(vit))]), rows


def test_a_p_value_and_its_holm_adjustment_are_shown_alike():
    """Review: "McNemar exact p < 0.0001 (Holm 1.5e-67)": the p-value was floored, its Holm
    adjustment not."""
    from medcli.compare_stats import _p

    assert _p({"p_value": 5e-68, "p_holm": 1.5e-67}) == "p < 0.0001"
    assert _p({"p_value": 5e-5, "p_holm": 0.0003}) == "p < 0.0001 (Holm 0.0003)"
    assert _p({"p_value": 0.02, "p_holm": 0.04}) == "p = 0.02 (Holm 0.04)"
    assert _p({"p_value": 0.02}) == "p = 0.02"


def test_a_predictions_file_changed_after_evaluate_is_no_ground_for_a_paired_test(tmp_path):
    """Review: aggregate checked metrics/<split>.json against the manifest, but the paired tests
    read predictions/<split>.csv unchecked: an edited or copied-in CSV fed McNemar."""
    import hashlib

    _cnn_vs_vit(tmp_path)
    run = Run.open(tmp_path / "vit")
    path = run.predictions_file("test")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    run.update(lambda data: data["stages"]["evaluate"]["artefacts"].__setitem__("predictions/test.csv", sha))
    predicted(tmp_path / "vit", RIGHT_A)  # another model's predictions in its place
    (pair,) = aggregate([tmp_path], metric_names=["accuracy"]).paired["pairs"]
    assert "predictions/test.csv of run" in pair["refused"] and "is not the file evaluate wrote" in pair["refused"]


def test_a_method_named_score_leads_only_among_scores_of_that_method():
    """Review: the `road` column (each run's own explanation method) starred a ViT's rollout score
    over a CNN's Grad-CAM score: faithfulness of two methods is no contest."""
    from medcli.compare_stats import leaders

    def group(name, road, method, acc):
        return {"group": name, "dataset": "bloodmnist", "size": 28, "data": "official", "experiment": {},
                "road": road, "road_method": method, "accuracy": acc}

    groups = [group("cnn", 0.06, "gradcam", 0.9), group("vit", 0.19, "rollout", 0.8),
              group("cnn2", 0.05, "gradcam", 0.7)]
    found = leaders(groups, ["accuracy", "road"])
    assert found == {"accuracy": ["cnn"], "road": ["cnn"]}  # rollout's one score has no rival


def test_no_paired_interval_between_scores_of_two_methods():
    """Self-review: the `road` leaders kept to one method, but the paired t-interval over seeds
    still took gradcam minus rollout (and counted it in Holm's adjustment)."""
    from medcli.compare_stats import _across_seeds

    pairs = [({"seed": s, "road": 0.05 + s / 100, "road_method": "gradcam", "accuracy": 0.9 + s / 100},
              {"seed": s, "road": 0.2 + s / 50, "road_method": "rollout", "accuracy": 0.8 + s / 70}) for s in range(3)]
    result = _across_seeds(pairs, ["accuracy", "road"])
    assert "different methods (gradcam, rollout)" in result["road"]["refused"]
    assert result["accuracy"]["p_value"] is not None
    same = [({**a, "road_method": "gradcam"}, {**b, "road_method": "gradcam"}) for a, b in pairs]
    assert "refused" not in _across_seeds(same, ["road"])["road"]


def test_p_values_are_cut_so_they_never_cross_a_threshold():
    """Review: f"{p:.2g}" printed 0.0496 and 0.0504 both as "p = 0.05" (and 0.00996 as 0.01)."""
    from medcli.compare_stats import _p, p_text

    assert [p_text(p) for p in (0.0496, 0.0504, 0.049996, 0.05, 0.00996, 1.0, 0.12345, 7e-5)] == \
        ["0.0496", "0.0504", "0.0499", "0.05", "0.00996", "1", "0.123", "< 0.0001"]
    assert _p({"p_value": 0.0496, "p_holm": 0.0992}) == "p = 0.0496 (Holm 0.0992)"
    least = {"test": "paired bootstrap", "p_value": 2 / 2001, "used": 2000}
    assert _p(least) == "p \u2264 0.000999"  # no resample against it: the least p 2,000 can give


def test_the_paired_bootstrap_interval_leaves_out_zero_exactly_when_p_is_below_005():
    """Review: "95% CI +0.0011 to +0.1833, paired bootstrap p = 0.051" (60 images): the
    interpolated percentile left 0 out where p did not reach 0.05 (50 of 2,000 differences
    <= 0). Here and on other sets near the line, the interval leaves out 0 iff p < 0.05."""
    def found(seed, shift):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 60).astype(bool)
        a = rng.normal(size=60) + y * 1.0
        b = a + rng.normal(size=60) * 1.0 - y * shift
        return metrics.paired_bootstrap_auc(y[:, None], a[:, None], b[:, None], 2000, 0)

    review = found(104, 0.3)
    assert review["p_value"] == pytest.approx(2 * 51 / 2001) and review["interval"][0] <= 0
    near = [found(seed, shift) for seed in range(20) for shift in (0.2, 0.3, 0.4)]
    near = [r for r in near if 0.02 < r["p_value"] < 0.1]
    assert len(near) > 5
    for r in near:
        low, high = r["interval"]
        assert (low > 0 or high < 0) == (r["p_value"] < 0.05), r


@pytest.mark.parametrize("used", [20, 39, 40, 999, 1000, 1999, 2000])
@pytest.mark.parametrize("level", [0.95, 0.99])
def test_the_bootstrap_interval_and_p_agree_for_every_count_of_resamples(used, level):
    """Review: with 1,999 resamples (one dropped) (1 - 0.95) x 2000 / 2 is 50.00000000000004,
    so the interval left out 0 beside p = 0.05; with too few resamples [min, max] left it out
    while p could not go below 0.05."""
    alpha = round(1 - level, 12)  # 1 - 0.95 is 0.05000000000000004: p = 0.05 is not below it
    for against in range(0, used // 10 + 2):
        d = np.r_[-np.arange(1, against + 1) / 1000, np.arange(1, used - against + 1) / 1000]
        interval, p = metrics.bootstrap_test(d, level)
        assert p == pytest.approx(min(1.0, 2 * (1 + against) / (used + 1)))
        if interval is None:
            assert p >= alpha
        else:
            assert (interval[0] > 0) == (p < alpha), (against, interval, p)


def test_leaders_are_the_best_at_the_precision_shown():
    """Review: 0.912346 and 0.912341 both read 91.23 %; the star went to one of them."""
    from medcli import compare_stats

    groups = [{"group": name, "accuracy": value, "dataset": "bloodmnist", "size": 28, "data": "official",
               "experiment": {}} for name, value in (("A", 0.912346), ("B", 0.912341), ("C", 0.9))]
    assert compare_stats.leaders(groups, ["accuracy"]) == {"accuracy": ["A", "B"]}
    # review: a mean half-way between two shown values: round() and the "%" format differed
    halfway = np.mean([0.88, 0.8975])
    assert f"{halfway:.2%}" == f"{0.8888:.2%}" == "88.88%"
    groups = [{**groups[0], "accuracy": halfway}, {**groups[1], "accuracy": 0.8888}]
    assert compare_stats.leaders(groups, ["accuracy"]) == {"accuracy": ["A", "B"]}
