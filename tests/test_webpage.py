"""`medcli report`: the run page and the comparison page are self-contained HTML (no script,
no link, nothing to fetch; every image an inlined PNG that decodes), written where `Run` says
and recorded in the manifest; a run not evaluated yet is a one-line usage error. In a real
headless browser (Chromium; skipped where none is installed) each page loads without a console
message, fetches nothing, decodes every image, and its screenshot shows the figures."""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

from medcli import webpage
from medcli.cli import app
from medcli.errors import UsageError
from medcli.run import Run

from cli_helpers import one_line_error

runner = CliRunner()
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WINDOW = (1280, 2000)  # the browser window of the screenshot, in CSS pixels


@pytest.fixture(scope="module")
def explained_runs(tiny_run, synthetic_root, tmp_path_factory) -> tuple[Path, Path]:
    """Two setups, evaluated on test and explained with gradcam on the same samples: a copy of
    the session's tiny run (calibrated) and a one-epoch run with another learning rate."""
    from medcli import evaluate, explain, train

    runs_dir = tmp_path_factory.mktemp("report") / "runs"
    first = shutil.copytree(tiny_run, runs_dir / tiny_run.name)
    second = train.train(root=synthetic_root, runs_dir=runs_dir, model="timm:test_resnet", epochs=1, batch_size=32,
                         optimizer="adamw", lr=1e-3, warmup_epochs=0.0, seed=0).run_dir
    for run in (first, second):
        evaluate.evaluate_run(run, calibrate=run == first, device="cpu", batch_size=64)
        explain.explain_run(run, per_class=1, faithfulness=False, device="cpu")
    return first, second


@pytest.fixture(scope="module")
def pages(explained_runs, tmp_path_factory) -> dict[str, Path]:
    """The run page of the first run and the comparison page of both, written by the CLI."""
    first, second = explained_runs
    written = {}
    for name, args in (("run", [str(first)]),
                       ("comparison", [str(first), str(second), "--out", str(tmp_path_factory.mktemp("compare"))])):
        result = runner.invoke(app, ["report", *args])
        assert result.exit_code == 0, result.output
        written[name] = Path(result.stdout.strip())
    return written


class _Tags(HTMLParser):
    """Every start tag and its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def self_contained_images(page: Path) -> list[bytes]:
    """Check that `page` needs nothing outside itself; returns its images (PNG bytes), each
    checked to decode to the size its tag gives."""
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    parser = _Tags()
    parser.feed(text)
    assert not {"script", "link", "iframe", "object", "embed"} & {tag for tag, _ in parser.tags}
    assert "url(" not in text  # no style that loads anything
    assert all(attrs["href"].startswith("#") for _, attrs in parser.tags if "href" in attrs)
    images = []
    for tag, attrs in parser.tags:
        if "src" in attrs:
            assert tag == "img" and attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:60]
            data = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                assert image.size == (int(attrs["width"]), int(attrs["height"]))
            images.append(data)
    return images


def test_the_run_page_is_self_contained_recorded_and_shows_every_figure(explained_runs, pages):
    page = pages["run"]
    run = Run.open(explained_runs[0])
    assert page == run.html_report_file().resolve()
    inlined = set(self_contained_images(page))
    drawn = [run.path(rel) for stage in ("train", "evaluate") for rel in run.stages[stage]["artefacts"]
             if rel.endswith(".png")]
    index = json.loads(run.explain_index("gradcam").read_text(encoding="utf-8"))
    grids = [run.explain_dir("gradcam") / name for name in index["grids"].values()]
    assert len(drawn) == 6 and len(grids) == 8  # curves; confusion, samples, mistakes, reliability, ROC; a grid a class
    assert {piece for path in drawn + grids for piece in _printed(path)} == inlined
    text = page.read_text(encoding="utf-8")
    banner = text.index('class="provenance"')
    assert "SYNTHETIC" in text[banner:text.index("</p>", banner)] and banner < text.index("<section")
    for needle in ("accuracy 95% CI", "auc 95% CI", "Temperature scaling fitted on val", "before", "after",
                   "Per class, test split", "Confusion matrix, test split", "Training options", run.run_id):
        assert needle in text, needle
    stage = run.stages["report"]
    assert stage["status"] == "completed" and set(stage["artefacts"]) == {run.relative(page)}
    assert stage["summary"]["splits"] == ["test"]


def test_the_comparison_page_has_the_table_tests_chart_and_maps(explained_runs, pages):
    page = pages["comparison"]
    assert page.name == "comparison.html"
    images = self_contained_images(page)
    assert images == [piece for name in (webpage.PAGE_CHART, "maps/maps_compare.png") for piece in _printed(page.parent / name)]
    text = page.read_text(encoding="utf-8").replace("<wbr>", "")  # a long id may wrap at its <wbr>s
    for needle in ("SYNTHETIC", "McNemar exact", "paired bootstrap", "Spearman", "top-20% IoU", "epochs=1",
                   *(Run.open(run).run_id for run in explained_runs)):
        assert needle in text, needle


def test_a_run_not_evaluated_or_several_runs_without_out_are_one_line_usage_errors(tiny_run, explained_runs,
                                                                                   tmp_path):
    copy = shutil.copytree(tiny_run, tmp_path / tiny_run.name)
    one_line_error(runner.invoke(app, ["report", str(copy)]), 2, f"medcli evaluate {copy}")
    run = Run.open(copy)
    assert not run.html_report_file().exists() and "report" not in run.stages
    one_line_error(runner.invoke(app, ["report", *map(str, explained_runs)]), 2, "--out DIR")
    one_line_error(runner.invoke(app, ["report", str(copy), "--out", str(tmp_path / "cmp")]), 2, "medcli evaluate")


@pytest.fixture(scope="module")
def chromium():
    """scripts/screenshot_reports.py, whose functions drive the browser; skips without one."""
    spec = importlib.util.spec_from_file_location("screenshot_reports", SCRIPTS / "screenshot_reports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.browser() is None:
        pytest.skip(f"no browser on PATH ({', '.join(module.BROWSERS)}): install chromium for the browser checks")
    return module


@pytest.mark.parametrize("name", ["run", "comparison"])
def test_each_page_loads_in_chromium_and_its_screenshot_shows_the_figures(pages, chromium, name, tmp_path):
    page = pages[name]
    shot = tmp_path / "shot.png"
    assert chromium.screenshot(page, shot, *WINDOW) == []  # no console message: no error, no blocked fetch
    loaded = chromium.probe(page, *WINDOW)
    assert loaded["resources"] == []  # nothing fetched, even without the page's content security policy
    assert len(loaded["images"]) == len(self_contained_images(page))
    assert all(image["complete"] and image["width"] > 0 for image in loaded["images"])
    screen = Image.open(shot).convert("L")
    assert screen.size == WINDOW
    shown = [image["box"] for image in loaded["images"] if image["box"][1] + image["box"][3] <= WINDOW[1]]
    assert shown, "no figure within the first screen"
    for x, y, width, height in shown:  # each figure on screen was painted: not a blank box
        assert ImageStat.Stat(screen.crop((int(x), int(y), int(x + width), int(y + height)))).stddev[0] > 20


def test_a_long_run_path_wraps_inside_the_page(explained_runs, chromium, tmp_path):
    """Review: a run directory with a long path (no hyphens to break at) made its table wider
    than the page: cut off in print, and the whole printout shrunk to fit."""
    deep = tmp_path / ("averylongfoldernamewithoutbreaks" * 6) / "runs"
    run = shutil.copytree(explained_runs[0], deep / explained_runs[0].name)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    boxes = chromium.probe(Path(result.stdout.strip()), *WINDOW)["boxes"]
    assert boxes and all(box["content"] <= box["shown"] for box in boxes), boxes


@pytest.mark.parametrize("width", [WINDOW[0], 700])
def test_table_cells_break_no_word_shorter_than_a_path(pages, chromium, width):
    """Review: `overflow-wrap: anywhere` let a table squeeze its text columns to a few letters
    ("breastmni / st 28 px") while the number columns stayed half empty, on screen and in
    print. Words wrap whole; only a word longer than LONG_WORD (a path, a run id) wraps, at its
    <wbr>s."""
    for page in pages.values():
        broken = chromium.probe(page, width, WINDOW[1])["broken"]
        assert [word for word in broken if len(word) <= webpage.LONG_WORD] == [], (page.name, broken)


def test_a_tall_figure_is_cut_into_page_high_strips_between_its_rows():
    """Review: the maps figure (672 x 2000 px) printed at a third of the page's width, its
    6.5-pt labels at about 3 pt: `max-height` shrank it to the page's height. It is now cut into
    strips a page holds at its width, in the blank bands between its rows (not between two lines
    of text), and the strips put together are the figure."""
    picture = np.full((2000, 600, 3), 255, np.uint8)
    blocks = []
    for top in range(30, 1900, 230):  # a row of the figure: 190 px, its lines of text 3 px apart
        for line in range(top, top + 190, 9):
            picture[line:line + 6, 40:560] = 0
        blocks.append((top, top + 190))
    data = io.BytesIO()
    Image.fromarray(picture).save(data, format="PNG")
    html_text = webpage._figure(Path("tall.png"), "a tall figure", data.getvalue())
    strips = [Image.open(io.BytesIO(base64.b64decode(found)))
              for found in re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)]
    assert len(strips) > 1 and all(strip.height <= webpage.PRINT_HEIGHT_PX for strip in strips)
    assert np.array_equal(np.concatenate([np.asarray(strip.convert("RGB")) for strip in strips]), picture)
    cuts = np.cumsum([strip.height for strip in strips])[:-1]
    assert not any(top <= cut < bottom for cut in cuts for top, bottom in blocks), cuts
    assert "a tall figure (part 1 of" in html_text and html_text.count("<figcaption>") == 1


def test_every_image_of_a_page_prints_at_its_size(pages):
    """An image printed at its size, or a page's width if it is wider, fits a page's height."""
    for page in pages.values():
        for data in self_contained_images(page):
            with Image.open(io.BytesIO(data)) as image:
                printed = image.height * min(1.0, webpage.PRINT_WIDTH_PX / image.width)
                assert printed <= webpage.PRINT_HEIGHT_PX, (page.name, image.size)


def _printed(path: Path) -> list[bytes]:
    """The images a page shows of a figure file: itself, or its strips (`webpage._strips`)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        return [strip for strip, _ in webpage._strips(data, *image.size)]


def test_the_run_page_says_how_best_pt_was_chosen_and_which_numbers_are_calibrated(explained_runs, pages):
    """Review: the page said "monitor acc" in the training options while best.pt was chosen by
    the EMA-window rule on AUC, and the metrics table showed ECE/NLL/Brier after temperature
    scaling without saying so."""
    from medcli import selection

    run = Run.open(explained_runs[0])
    text = " ".join(pages["run"].read_text(encoding="utf-8").split())
    options = text[text.index("Training options"):text.index("<h3>Model</h3>")]
    assert html.escape(selection.describe(selection.rule(run.config), run.config["epochs"]), quote=False) in options
    assert ">monitor<" not in options and ">select<" not in options
    assert "ECE, NLL and Brier of test are after temperature scaling" in text


def test_a_binary_page_names_the_class_its_rates_are_of(tmp_path):
    """Review: BreastMNIST's sensitivity, specificity, PPV and NPV are of malignant (class 0),
    its AUC of class 1, and the page said neither."""
    run = Run.create(tmp_path, "r", config={}, dataset={"flag": "breastmnist", "size": 28})
    result = {"task": "binary-class", "positive_class": "malignant", "calibration": None,
              "ci": {"level": 0.95, "method": "percentile bootstrap", "resamples": 10, "seed": 0},
              "metrics": {"n": 4, "per_class": []}}
    text = webpage._metrics(run, {"test": result})
    assert "sensitivity, specificity, PPV and NPV are of malignant" in text


@pytest.mark.parametrize("damage", ["other run's metrics", "truncated figure", "missing figures", "redrawn figure"])
def test_a_run_page_never_shows_files_the_run_did_not_write(explained_runs, tmp_path, damage):
    """Review: another run's metrics/test.json copied into the run was shown beside this run's
    figures (exit 0); a PNG cut short was a blank image, or at 2 bytes "unexpected error"
    (exit 1); deleted figures were dropped without a word. A figure redrawn since (plot-confusion
    writes figures/confusion_test.png too) is shown, and its caption says so."""
    first, second = explained_runs
    run = shutil.copytree(first, tmp_path / first.name)
    figure = run / "figures" / "confusion_test.png"
    if damage == "other run's metrics":
        shutil.copyfile(second / "metrics" / "test.json", run / "metrics" / "test.json")
    elif damage == "truncated figure":  # review: a PNG cut after its header was shown as a broken image
        figure.write_bytes(figure.read_bytes()[:5000])
    elif damage == "missing figures":
        shutil.rmtree(run / "figures")
    else:
        shutil.copyfile(second / "figures" / "confusion_test.png", figure)
    result = runner.invoke(app, ["report", str(run)])
    text = " ".join(Run.open(run).html_report_file().read_text(encoding="utf-8").split()) if result.exit_code == 0 else ""
    if damage == "missing figures":
        assert result.exit_code == 0, result.output
        assert "figures/confusion_test.png is missing" in text and "figures/curves.png is missing" in text
    elif damage == "redrawn figure":
        assert result.exit_code == 0, result.output
        assert "Confusion matrix, test split (not the file the evaluate stage wrote: redrawn or replaced since)" in text
        assert text.count("redrawn or replaced since") == 2  # its alt text and caption: no other figure
    elif damage == "truncated figure":
        one_line_error(result, 2, "figures/confusion_test.png", "is not a whole PNG image")
    else:
        one_line_error(result, 2, "metrics/test.json", "is not the file this run wrote", "re-run 'medcli evaluate")


def test_a_comparison_page_without_maps_removes_the_earlier_pages_maps_files(explained_runs, tmp_path, capsys):
    """Review: a page whose runs had no comparable explanations left the maps/ files of the page
    it replaced in DIR (chestmnist's agreement beside a breast-vs-retina page), unsaid."""
    from test_aggregate import make_run

    out = tmp_path / "out"
    webpage.write_comparison_page(explained_runs, out)
    assert len(list((out / webpage.MAPS_DIR).iterdir())) == 3
    plain = [make_run(tmp_path / "runs", name, model=model) for name, model in (("a", "resnet18"), ("b", "vit-tiny"))]
    capsys.readouterr()
    webpage.write_comparison_page(plain, out)
    assert not (out / webpage.MAPS_DIR).exists() or not list((out / webpage.MAPS_DIR).iterdir())
    assert "removed the earlier comparison of explanation maps" in " ".join(capsys.readouterr().err.split())


def test_no_paired_tests_between_setups_on_different_files_says_why(tmp_path):
    """Review: two setups tested on different files were told to "choose two with --pair",
    which cannot help: paired tests need the same images."""
    from test_aggregate import make_run

    runs = [make_run(tmp_path / "runs", "a"), make_run(tmp_path / "runs", "b", model="vit-tiny", dataset={"md5": "def"})]
    text = " ".join(webpage.write_comparison_page(runs, tmp_path / "out").read_text(encoding="utf-8").split())
    assert "No paired tests: they compare two setups on the same images, and no two of its setups were tested on " \
           "the same data file." in text


def test_a_comparison_page_replaces_its_files_together_and_a_bad_pair_replaces_nothing(tmp_path, monkeypatch, capsys):
    """Review: `report RUN... --out DIR` stopped midway left the new chart beside the old page;
    `--pair x y` said it was replacing the earlier files, then refused."""
    from medcli.errors import MedcliError

    from test_aggregate import make_run

    runs = [make_run(tmp_path / "runs", name, model=model) for name, model in (("a", "resnet18"), ("b", "vit-tiny"))]
    out = tmp_path / "out"
    webpage.write_comparison_page(runs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(UsageError, match="--pair"):
        webpage.write_comparison_page(runs, out, pair=["x", "y"])
    assert "replacing" not in capsys.readouterr().err

    def fail(*args):
        raise MedcliError("writing the page failed (No space left on device)")

    monkeypatch.setattr(webpage, "comparison_page", fail)
    make_run(tmp_path / "runs", "c", model="vit-small", accuracy=0.5)
    with pytest.raises(MedcliError, match="No space left"):
        webpage.write_comparison_page([*runs, tmp_path / "runs" / "c"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the chart too; no folder left behind


def test_a_file_where_the_pages_maps_folder_goes_is_refused_before_anything_is_written(tmp_path):
    """Review: with a file named maps in DIR the page and chart were moved in, then the maps
    folder failed with a raw FileExistsError."""
    from test_aggregate import make_run

    runs = [make_run(tmp_path / "runs", name, model=model) for name, model in (("a", "resnet18"), ("b", "vit-tiny"))]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / webpage.MAPS_DIR).write_text("not a folder")
    with pytest.raises(UsageError, match=f"holds a file named {webpage.MAPS_DIR}, where a folder of its files goes"):
        webpage.write_comparison_page(runs, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [webpage.MAPS_DIR]


def test_the_comparison_page_keeps_aggregates_chart_and_says_what_it_replaces(tmp_path, capsys):
    """Review: `report --out DIR` wrote its chart over aggregate's comparison.png in DIR (the md
    then described metrics the chart no longer showed), and replaced an earlier page unsaid."""
    from medcli import aggregate

    from test_aggregate import make_run

    runs = [make_run(tmp_path / "runs", name, model=model) for name, model in (("a", "resnet18"), ("b", "vit-tiny"))]
    out = tmp_path / "out"
    aggregate.write_outputs(out, aggregate.aggregate(runs, metric_names=["accuracy"]))
    chart = (out / "comparison.png").read_bytes()
    for _ in range(2):
        capsys.readouterr()
        page = webpage.write_comparison_page(runs, out)
    assert (out / "comparison.png").read_bytes() == chart
    assert f"replacing the earlier {page.name}, {webpage.PAGE_CHART} in {out}" in capsys.readouterr().err


def test_a_comparison_page_of_three_setups_tests_the_pair_named(tmp_path):
    """Review: the page of three setups told the reader to choose two with `aggregate --pair`,
    which never changes the page; `report --pair A B` does."""
    from test_aggregate import make_run
    from test_compare_stats import RIGHT_A, RIGHT_B, predicted

    runs = [make_run(tmp_path / "runs", name, model=model, checkpoint_sha256=name * 64)
            for name, model in (("a", "resnet18"), ("b", "vit-tiny"), ("c", "vit-small"))]
    for run, right in zip(runs, (RIGHT_A, RIGHT_B, RIGHT_B)):
        predicted(run, right)
    texts = {}
    for name, pair in (("none", []), ("ab", ["--pair", str(runs[0]), str(runs[1])])):
        result = runner.invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / name), *pair])
        assert result.exit_code == 0, result.output
        texts[name] = Path(result.stdout.strip()).read_text(encoding="utf-8")
    assert "choose two with &#x27;medcli report --pair A B&#x27;" in texts["none"] and "McNemar" not in texts["none"]
    assert "McNemar exact p = 0.0385" in texts["ab"]
    alone = runner.invoke(app, ["report", str(runs[0]), "--pair", "a", "b"])
    assert alone.exit_code == 2 and "--pair" in one_line_error(alone)


def test_evaluate_and_explain_redraw_a_page_the_run_has(explained_runs, tmp_path):
    """Review: after `report`, `evaluate --calibrate` rewrote the metrics and report.xlsx while
    report.html still said "Not calibrated" with the old ECE, and nothing said so."""
    run = Run.open(shutil.copytree(explained_runs[1], tmp_path / "run"))
    page = webpage.write_run_page(run.run_dir)
    assert "Temperature scaling fitted on val" not in page.read_text(encoding="utf-8")
    assert runner.invoke(app, ["evaluate", str(run.run_dir), "--calibrate", "--device", "cpu"]).exit_code == 0
    assert "Temperature scaling fitted on val" in page.read_text(encoding="utf-8")
    assert runner.invoke(app, ["explain", str(run.run_dir), "--method", "eigencam", "--per-class", "1",
                               "--no-faithfulness", "--device", "cpu"]).exit_code == 0
    assert "eigencam" in page.read_text(encoding="utf-8")


def test_agreement_cells_without_a_value_read_n_a_and_every_value_has_three_decimals(tmp_path):
    """Review: a pair or class whose maps were all constant (no rank correlation) showed the
    Python literal "None" on the comparison page, beside values of 3 and 4 decimals."""
    from medcli import reports

    figure = reports.save_figure(__import__("matplotlib.figure").figure.Figure(figsize=(1, 1)), tmp_path / "maps.png")
    agreement = {"samples": 3, "split": "test", "dataset": "bloodmnist", "columns": ["A", "B"], "files": [str(figure)],
                 "pairs": [{"a": "A", "b": "B", "spearman": None, "top20_iou": 0.5344,
                            "per_class": {"basophil": {"spearman": 0.418, "top20_iou": None, "n": 3}}}]}
    def cells(found):
        return [html.unescape(cell) for cell in __import__("re").findall(r'<td class="num">([^<]*)</td>', found)]

    assert cells(webpage._agreement(agreement)) == ["n/a", "0.534", "3", "0.418", "n/a", "3"]  # an older summary
    # self-review: the page showed only the samples a mean is over, as if a class had no others
    agreement["pairs"][0].update(n=2, undefined=1)
    agreement["pairs"][0]["per_class"]["basophil"].update(n=2, undefined=1)
    assert cells(webpage._agreement(agreement)) == ["n/a", "0.534", "2 (1 more with a constant map)", "0.418", "n/a",
                                                    "2 (1 more with a constant map)"]


def test_commands_a_page_suggests_work_from_any_folder(tmp_path, monkeypatch):
    """Review: 'Not explained yet: medcli explain runs/2026...' gave the path as typed: relative
    (wrong from any other folder, or on a page read elsewhere) and unquoted (a folder with a
    space broke it). Every suggested command names the run by its absolute path, quoted."""
    import shlex

    monkeypatch.chdir(tmp_path)
    run = Run.create(Path("my runs"), "r", config={}, dataset={"flag": "bloodmnist", "size": 28})
    run = Run.open(Path("my runs") / run.run_dir.name)
    text = html.unescape(webpage._explanations(run))
    assert f"'medcli explain {shlex.quote(str((tmp_path / run.run_dir).resolve()))}'" in text
    assert shlex.split(run.command("explain", "--method", "gradcam"))[2:] == [str(run.run_dir.resolve()), "--method",
                                                                              "gradcam"]


def test_a_multi_label_calibration_shows_each_labels_temperature(tmp_path):
    """Review: the page gave a multi-label calibration's temperatures only as a range."""
    run = Run.create(tmp_path, "r", config={}, dataset={"flag": "chestmnist", "size": 28})
    result = {"class_names": ["effusion", "mass"], "calibration": {
        "fitted_on": "val", "temperature": [0.75, 1.25], "skipped": None, "before": {"ece": 0.1}, "after": {"ece": 0.05}}}
    text = " ".join(webpage._calibration(run, {"test": result}).split())
    assert "The temperature of each label, test split" in text
    assert "<td>effusion</td> <td class=\"num\">0.750</td>" in text.replace("><", "> <"), text


def test_an_uncalibrated_val_split_is_not_advised_to_calibrate_on_itself(tmp_path):
    """Review: the page advised 'medcli evaluate RUN --split val --calibrate' for val, where the
    temperature is fitted: its numbers after scaling flatter it. It points at the test split."""
    run = Run.create(tmp_path, "r", config={}, dataset={"flag": "bloodmnist", "size": 28})
    text = html.unescape(" ".join(webpage._calibration(run, {"val": {}, "test": {}}).split()))
    val, test = text.split("test split", 1)
    assert "--split val" not in val and "fitted on this split" in val and run.evaluate_command("test", "--calibrate") in val
    assert run.evaluate_command("test", "--calibrate") in test
    calibrated = {"calibration": {"fitted_on": "val", "temperature": 1.5, "skipped": None, "before": {"ece": 0.1},
                                  "after": {"ece": 0.05}}}
    text = html.unescape(" ".join(webpage._calibration(run, {"val": {}, "test": calibrated}).split()))
    assert "the test split's section shows its calibration" in text and "--calibrate" not in text


def test_numbers_in_the_run_tables_are_not_raw_floats():
    """Review: the Training block printed 'best_value 0.9984523777879958'."""
    text = webpage._pairs([("best_value", 0.9984523777879958), ("epochs", 60), ("lr", 0.1), ("ema_decay", 0.99912345678)])
    assert "0.998452<" in text and "0.99845237" not in text and ">60<" in text and ">0.1<" in text
    assert "0.999123<" in text


def test_a_killed_evaluation_of_another_split_leaves_the_page_of_the_splits_evaluated_before(explained_runs,
                                                                                              tmp_path):
    """Review: an `evaluate --split val` killed (kill -9) left the evaluate stage "running"
    with a dead pid; `aggregate` compared the run's intact test results, but `report` refused
    the run and advised evaluating test again."""
    import subprocess
    import sys

    run = Path(shutil.copytree(explained_runs[0], tmp_path / "run"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Run.open(run).update(lambda data: data["stages"]["evaluate"].update(status="running", pid=dead.pid))
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "the last evaluate attempt of run" in result.stderr and "did not finish (running)" in result.stderr
    assert "test split" in (run / "report.html").read_text(encoding="utf-8")
    Run.open(run).update(lambda data: data["stages"]["evaluate"]["summary"].clear())  # nothing evaluated before it
    refused = runner.invoke(app, ["report", str(run)])
    assert refused.exit_code == 2 and "did not finish" in refused.stderr and "evaluate it first" in refused.stderr
