"""compare.py on synthetic logs: crossing points, resumes, speed-ups, the CLI, errors, wandb."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import compare  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(folder, lines):
    """Write <folder>/metrics.jsonl; dicts are dumped as JSON (NaN as NaN), strings written as-is."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def config_line(name, optimizer):
    return {"kind": "config", "run_name": name, "optimizer": optimizer, "config": {"learning_rate": 6e-4}}


def eval_line(iteration, val_loss, time=None, tokens_per_iter=1000):
    row = {"kind": "eval", "iter": iteration, "tokens": iteration * tokens_per_iter,
           "time": iteration * 1.0 if time is None else time, "train/loss": val_loss - 0.01,
           "val/loss": val_loss, "lr": 6e-4}
    return row


def train_line(iteration, loss, time=None):
    return {"kind": "train", "iter": iteration, "tokens": iteration * 1000,
            "time": iteration * 1.0 if time is None else time, "loss": loss, "lr": 6e-4,
            "ms_per_iter": 10.0, "tokens_per_s": 1e5, "mfu": None}


def write_study(tmp_path):
    """Three runs of different lengths. Target 3.0 = adamw-good's best (reached at iter 400).
    sophia crosses 3.0 halfway between iter 200 (3.1) and 300 (2.9): 250 iters, 250k tokens,
    and 240 + 0.5 * 120 = 300 s (1.2 s per iteration). adamw-bad never gets below 4.0."""
    sophia = [config_line("sophia", "sophiag")]
    sophia += [eval_line(i, loss, time=1.2 * i) for i, loss in zip([0, 100, 200, 300], [6.0, 3.6, 3.1, 2.9])]
    sophia += [train_line(i, 5.0 - i / 1000, time=1.2 * i) for i in range(0, 301, 50)]
    good = [config_line("adamw-good", "adamw")]
    good += [eval_line(i, loss) for i, loss in zip([0, 100, 200, 300, 400], [6.0, 4.0, 3.5, 3.2, 3.0])]
    bad = [config_line("adamw-bad", "adamw")]
    bad += [eval_line(i, loss) for i, loss in zip([0, 100, 200], [6.0, 4.5, 4.0])]
    return [write_log(str(tmp_path / name), lines)
            for name, lines in [("out-sophia", sophia), ("out-good", good), ("out-bad", bad)]]


# -----------------------------------------------------------------------------
# crossing points


def test_crossing_is_interpolated_between_the_evals_around_it(tmp_path):
    # time is not proportional to iter, so each axis is interpolated on its own values
    times = [0.0, 60.0, 110.0, 170.0]
    lines = [config_line("r", "sophiag")] + [
        eval_line(i, loss, time=t) for i, loss, t in zip([0, 100, 200, 300], [10.0, 4.0, 3.0, 2.5], times)]
    run = compare.load_run(write_log(str(tmp_path / "r"), lines))
    # 3.5 lies halfway between 4.0 (iter 100) and 3.0 (iter 200)
    assert compare.iters_to_target(run, 3.5) == pytest.approx(150.0)
    assert compare.tokens_to_target(run, 3.5) == pytest.approx(150_000.0)
    assert compare.seconds_to_target(run, 3.5) == pytest.approx(85.0)  # 60 + 0.5 * 50
    # 3.8 is a fifth of the way from 4.0 to 3.0
    assert compare.iters_to_target(run, 3.8) == pytest.approx(120.0)
    # a target met exactly at an eval point: that point
    assert compare.iters_to_target(run, 3.0) == pytest.approx(200.0)
    # already below the target at the first eval: the first eval point
    assert compare.iters_to_target(run, 11.0) == 0.0
    # never reached
    assert compare.iters_to_target(run, 2.0) is None
    assert compare.seconds_to_target(run, 2.0) is None


def test_crossing_is_the_first_one_even_if_the_loss_rises_again(tmp_path):
    lines = [config_line("r", "adamw")] + [
        eval_line(i, loss) for i, loss in zip([0, 100, 200, 300], [5.0, 3.0, 4.0, 2.0])]
    run = compare.load_run(write_log(str(tmp_path / "r"), lines))
    assert compare.iters_to_target(run, 4.0) == pytest.approx(50.0)  # 5.0 -> 3.0, halfway
    assert compare.iters_to_target(run, 2.5) == pytest.approx(275.0)  # 4.0 -> 2.0, 3/4 of the way


def test_nulls_nans_and_missing_values_are_skipped(tmp_path):
    lines = [
        config_line("r", "sophiag"),
        train_line(0, 9.0),
        {"kind": "train", "iter": 10, "loss": float("nan"), "mfu": None, "time": 10.0},
        {"kind": "train", "loss": 5.0},  # no iter: cannot be placed
        eval_line(0, 5.0),
        {"kind": "eval", "iter": 100, "tokens": 100_000, "time": 100.0, "val/loss": float("nan")},
        '{"kind": "eval", "iter": 150, "tokens": 150000, "time": null, "val/loss": Infinity}',
        '{"kind": "eval", "iter": 200, "tokens": 200000, "val/loss": 3.0, "train/loss": null}',
        {"kind": "heartbeat", "iter": 250},  # a kind this script does not know: ignored
        eval_line(300, 2.0, time=600.0),
    ]
    run = compare.load_run(write_log(str(tmp_path / "r"), lines))
    assert [row["iter"] for row in run.eval] == [0, 100, 150, 200, 300]
    assert [row["iter"] for row in run.val_points()] == [0, 200, 300]
    assert [row["iter"] for row in run.train] == [0, 10]
    assert "loss" not in run.train[1] and "mfu" not in run.train[0]
    # the NaN and infinite evals are not crossings: 5.0 at iter 0 -> 3.0 at iter 200
    assert compare.iters_to_target(run, 4.0) == pytest.approx(100.0)
    # iter 200 has no time: seconds interpolate between the points that have one, 5.0 at 0 s
    # and 2.0 at 600 s (3.5 is halfway), where the iterations cross between iters 0 and 200
    assert compare.seconds_to_target(run, 3.5) == pytest.approx(300.0)
    assert compare.iters_to_target(run, 3.5) == pytest.approx(150.0)
    assert compare.best_val_loss(run) == 2.0 and compare.final_val_loss(run) == 2.0
    row = compare.comparison_table([run])[0]
    assert row["iters_to_target"] == pytest.approx(300.0)


def test_resume_later_lines_supersede_earlier_ones(tmp_path):
    lines = [config_line("first-name", "sophiag")]
    lines += [eval_line(i, loss) for i, loss in zip([0, 100, 200, 300], [6.0, 5.0, 4.0, 3.0])]
    lines += [train_line(i, 9.0 - i / 100) for i in (0, 100, 200, 300)]
    # crashed after iter 300, resumed from the checkpoint at iter 100: the run re-logs 100 and 200
    lines += [config_line("resumed-name", "sophiag")]
    lines += [eval_line(100, 5.5), train_line(100, 1.0), eval_line(200, 4.5)]
    run = compare.load_run(write_log(str(tmp_path / "out-r"), lines))
    assert run.name == "resumed-name"
    assert [(row["iter"], row["val/loss"]) for row in run.eval] == [(0, 6.0), (100, 5.5), (200, 4.5)]
    assert [(row["iter"], row["loss"]) for row in run.train] == [(0, 9.0), (100, 1.0)]
    assert compare.best_val_loss(run) == 4.5  # the abandoned 3.0 at iter 300 is gone


def test_name_falls_back_to_folder_and_optimizer_to_logged_keys(tmp_path):
    lines = [{"kind": "config", "config": {}}, eval_line(0, 4.0),
             dict(train_line(0, 4.0), **{"train/win_rate": 0.3})]
    write_log(str(tmp_path / "out-nameless"), lines)
    run = compare.load_run(str(tmp_path / "out-nameless"))  # the out_dir, not the file
    assert run.name == "out-nameless"
    assert run.optimizer == "sophiag"  # only Sophia runs log a win rate


# -----------------------------------------------------------------------------
# comparing runs


def test_comparison_table_speedups_against_the_tuned_adamw(tmp_path):
    runs = [compare.load_run(path) for path in write_study(tmp_path)]
    # default baseline: the AdamW run with the lowest val loss; target: its best val loss
    rows = compare.comparison_table(runs)
    sophia, good, bad = rows
    assert [row["is_baseline"] for row in rows] == [False, True, False]
    assert sophia["target"] == 3.0 and sophia["baseline"] == "adamw-good"
    assert sophia["optimizer"] == "sophiag" and good["optimizer"] == "adamw"
    assert sophia["final_val_loss"] == 2.9 and bad["best_val_loss"] == 4.0
    assert sophia["iters_to_target"] == pytest.approx(250.0)
    assert sophia["tokens_to_target"] == pytest.approx(250_000.0)
    assert sophia["seconds_to_target"] == pytest.approx(300.0)
    assert good["iters_to_target"] == pytest.approx(400.0)
    assert sophia["speedup_iters"] == pytest.approx(1.6)  # 400 / 250
    assert sophia["speedup_tokens"] == pytest.approx(1.6)
    assert sophia["speedup_seconds"] == pytest.approx(400 / 300)
    assert good["speedup_iters"] == pytest.approx(1.0)
    for key in ["iters_to_target", "tokens_to_target", "seconds_to_target",
                "speedup_iters", "speedup_tokens", "speedup_seconds"]:
        assert bad[key] is None  # never reaches 3.0


def test_comparison_table_with_chosen_baseline_and_target(tmp_path):
    runs = [compare.load_run(path) for path in write_study(tmp_path)]
    # target 4.25: sophia between 6.0 (0) and 3.6 (100): 2.4 of 1.75 -> 72.9 iters;
    # adamw-bad between 4.5 (100) and 4.0 (200): halfway, 150 iters
    rows = compare.comparison_table(runs, baseline="adamw-bad", target=4.25)
    assert rows[2]["is_baseline"] and rows[2]["iters_to_target"] == pytest.approx(150.0)
    sophia_iters = 100 * (6.0 - 4.25) / (6.0 - 3.6)
    assert rows[0]["iters_to_target"] == pytest.approx(sophia_iters)
    assert rows[0]["speedup_iters"] == pytest.approx(150.0 / sophia_iters)
    # a position works as well as a name
    assert compare.comparison_table(runs, baseline=0)[0]["is_baseline"]
    assert compare.comparison_table(runs, baseline="0")[0]["is_baseline"]
    with pytest.raises(compare.CompareError, match="matches no run"):
        compare.comparison_table(runs, baseline="adamw-best")


def test_format_table_plain_and_markdown(tmp_path):
    runs = [compare.load_run(path) for path in write_study(tmp_path)]
    rows = compare.comparison_table(runs)
    plain = compare.format_table(rows).splitlines()
    assert plain[0].split()[:2] == ["run", "optimizer"]
    sophia_line = next(line for line in plain if line.startswith("sophia "))
    assert sophia_line.split() == ["sophia", "sophiag", "2.9000", "2.9000", "250", "250k", "5.0", "min",
                                   "1.60x", "1.60x", "1.33x"]
    bad_line = next(line for line in plain if line.startswith("adamw-bad"))
    assert bad_line.split().count("—") == 6
    assert next(line for line in plain if line.startswith("adamw-good")).startswith("adamw-good *")
    assert "target: val loss 3.0000" in plain[-1]
    markdown = compare.format_table(rows, markdown=True).splitlines()
    assert markdown[0].startswith("| run | optimizer |") and markdown[1].startswith("|:---|:---|---:|")
    assert "| sophia | sophiag | 2.9000 | 2.9000 | 250 | 250k | 5.0 min | 1.60x | 1.60x | 1.33x |" in markdown


def panel_curves(figure):
    """{label: (xs, ys)} of every line in each panel of a loss_figure, one dict per panel."""
    return [{line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panel.get_lines()}
            for panel in figure.axes]


def legend_texts(figure):
    return [[text.get_text() for text in panel.get_legend().get_texts()] for panel in figure.axes]


def test_runs_sharing_a_name_are_labelled_by_their_out_dir(tmp_path):
    # one config run three times with different overrides: all three log run_name "sweep"
    paths = []
    for folder, final in [("out-sweep-lr1e-3", 3.2), ("out-sweep-lr3e-3", 3.0), ("nested/out-sweep-lr3e-3", 3.1)]:
        lines = [config_line("sweep", "sophiag"), eval_line(0, 6.0), eval_line(100, final),
                 train_line(0, 6.0), train_line(100, final)]
        paths.append(write_log(str(tmp_path / folder), lines))
    paths.append(write_log(str(tmp_path / "out-adam"), [config_line("adamw-tuned", "adamw"),
                                                         eval_line(0, 6.0), eval_line(100, 3.0)]))
    runs = [compare.load_run(path) for path in paths]
    # the folder name where it is unique, a trailing path where folder names collide too, and
    # the run name where no other run shares it
    expected = ["out-sweep-lr1e-3", f"{tmp_path.name}/out-sweep-lr3e-3", "nested/out-sweep-lr3e-3", "adamw-tuned"]
    assert compare.run_labels(runs) == expected
    rows = compare.comparison_table(runs)
    assert [row["run"] for row in rows] == expected and rows[0]["baseline"] == "adamw-tuned"
    table = compare.format_table(rows).splitlines()
    assert [line.split()[0] for line in table[2:6]] == expected
    for which in ["val", "train"]:
        figure = compare.loss_figure(runs, which)
        for texts in legend_texts(figure):
            assert [text.split(" (")[0] for text in texts] == (expected if which == "val" else expected[:3])
    # the same folder given twice cannot be told apart by its path: its position among the runs
    assert compare.run_labels([runs[0], runs[0], runs[3]]) == [
        "out-sweep-lr1e-3 [0]", "out-sweep-lr1e-3 [1]", "adamw-tuned"]


def test_target_line_is_labelled(tmp_path, capsys, monkeypatch):
    # spy on the figures main() makes, then check the val plot's target line and legend
    figures = {}
    real_loss_figure = compare.loss_figure

    def keep_figure(runs, which, *args, **kwargs):
        figures[which] = real_loss_figure(runs, which, *args, **kwargs)
        return figures[which]

    monkeypatch.setattr(compare, "loss_figure", keep_figure)
    paths = write_study(tmp_path)
    out = ["--out", str(tmp_path / "plots")]
    for argv, label in [([], "target: best val loss of adamw-good = 3.0000"),
                        (["--target", "3.5"], "target: val loss 3.5000 (--target)")]:
        assert run_main(capsys, [*paths, *out, *argv])[0] == 0
        target = 3.5 if argv else 3.0
        for curves, texts in zip(panel_curves(figures["val"]), legend_texts(figures["val"])):
            assert curves[label][1] == [target, target] and label in texts
        assert not any(text.startswith("target") for texts in legend_texts(figures["train"]) for text in texts)
    # without a label from the caller, the line still says what it is
    runs = [compare.load_run(path) for path in paths]
    assert "target: val loss 3.2500" in legend_texts(compare.loss_figure(runs, "val", target=3.25))[0]


def test_train_plot_uses_the_logged_train_rows(tmp_path):
    # the train rows' loss (mean over each log interval) and the evals' train/loss differ on
    # purpose: only the former belongs on the train plot
    lines = [config_line("r", "sophiag")]
    lines += [eval_line(i, loss, time=2.0 * i) for i, loss in [(0, 6.0), (100, 4.0), (200, 3.0)]]
    lines += [train_line(i, 5.5 - i / 100, time=2.0 * i) for i in range(10, 201, 10)]
    runs = [compare.load_run(write_log(str(tmp_path / "out-r"), lines))]
    # a run that logged evals only has nothing to draw on the train plot
    runs.append(compare.load_run(write_log(str(tmp_path / "out-e"), [config_line("e", "adamw"), eval_line(0, 6.0)])))
    expected_ys = [5.5 - i / 100 for i in range(10, 201, 10)]
    for panel, (x_key, _) in zip(panel_curves(compare.loss_figure(runs, "train")), compare.AXES):
        assert list(panel) == ["r (sophiag)"]
        xs, ys = panel["r (sophiag)"]
        assert xs == [row[x_key] for row in runs[0].train] and ys == pytest.approx(expected_ys)
    # the val plot, for contrast, has the eval points
    assert panel_curves(compare.loss_figure(runs, "val"))[0]["r (sophiag)"][1] == [6.0, 4.0, 3.0]


def test_loss_units_are_stated(tmp_path):
    runs = [compare.load_run(path) for path in write_study(tmp_path)]
    header, *_, note = compare.format_table(compare.comparison_table(runs)).splitlines()
    assert "final val (nats)" in header and "best val (nats)" in header
    assert note.startswith("loss = mean cross-entropy per token, in nats (natural log);")
    for which in ["val", "train"]:
        figure = compare.loss_figure(runs, which, title="t")
        assert [panel.get_ylabel() for panel in figure.axes] == [f"{which} loss (nats)"] * 3
        assert f"{which} loss: mean cross-entropy per token, in nats (natural log)" in figure.get_suptitle()


def test_y_limits_ignore_the_first_huge_losses():
    low, high = compare._y_limits([([0, 100, 200, 300, 400], [10.9, 4.0, 3.5, 3.2, 3.0]),
                                   ([0, 100, 200], [10.9, 4.2, 3.8])])
    assert 3.0 - 0.1 < low < 3.0 and 4.2 < high < 4.2 + 0.1


# -----------------------------------------------------------------------------
# the command line


def test_cli_end_to_end(tmp_path):
    paths = write_study(tmp_path)
    out = str(tmp_path / "assets" / "cmp")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), *paths, "--out", out,
                             "--title", "synthetic", "--log-x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert next(line for line in lines if line.startswith("sophia ")).split()[-3:] == ["1.60x", "1.60x", "1.33x"]
    written = [line.split(" ", 1)[1] for line in lines if line.startswith("wrote ")]
    assert written == [out + "_val_loss.png", out + "_train_loss.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        assert os.path.getsize(path) > 10_000  # three panels of curves, not an empty canvas


def test_plots_go_to_git_ignored_folders_by_default_and_in_the_readme(tmp_path, capsys, monkeypatch):
    # assets/ is tracked (the study's committed plots): a plain run must not write there
    paths = write_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_main(capsys, paths)
    assert status == 0 and "wrote out-compare/val_loss.png" in out
    assert sorted(os.listdir(tmp_path / "out-compare")) == ["train_loss.png", "val_loss.png"]
    with open(os.path.join(ROOT, "README.md")) as f:
        examples = [line for line in f if line.startswith("python compare.py")]
    assert examples and all(" --out=out-" in line for line in examples)  # .gitignore has out*/


def test_cli_exit_status_2_for_a_missing_path(tmp_path):
    missing = str(tmp_path / "out-never-ran")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), missing],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"compare.py: error: {missing} does not exist; pass a run's out_dir, its metrics.jsonl, "
        "or a wandb offline-run-* folder"]


def run_main(capsys, argv):
    status = compare.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


@pytest.mark.parametrize("case, expected", [
    ("empty", "is empty"),
    ("blank-lines", "is empty"),
    ("config-only", "holds no train or eval rows"),
    ("malformed", "metrics.jsonl:3: malformed JSON"),
    ("not-an-object", "metrics.jsonl:2: expected a JSON object, got list"),
    ("no-run-files", "holds no metrics.jsonl and 0 .wandb files"),
])
def test_cli_errors_in_a_log(tmp_path, capsys, case, expected):
    folder = str(tmp_path / case)
    if case == "empty":
        write_log(folder, [])
    elif case == "blank-lines":
        write_log(folder, ["", "  "])
    elif case == "config-only":
        write_log(folder, [config_line("r", "adamw")])
    elif case == "malformed":
        write_log(folder, [config_line("r", "adamw"), eval_line(0, 5.0), '{"kind": "eval", "iter": 1'])
    elif case == "not-an-object":
        write_log(folder, [config_line("r", "adamw"), "[1, 2]"])
    else:
        os.makedirs(folder)
    status, out, err = run_main(capsys, [folder, "--out", str(tmp_path / "plots")])
    assert status == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("compare.py: error: ") and expected in err[0]
    assert not os.path.exists(tmp_path / "plots")


def test_cli_errors_in_arguments(tmp_path, capsys):
    paths = write_study(tmp_path)
    out = ["--out", str(tmp_path / "plots")]
    status, _, err = run_main(capsys, [*paths, "--baseline", "adamw-best", *out])
    assert status == 2 and len(err) == 1
    assert "baseline 'adamw-best' matches no run; pass one of 'sophia', 'adamw-good', 'adamw-bad'" in err[0]
    status, _, err = run_main(capsys, [*paths, "--baseline", "3", *out])
    assert status == 2 and "position from 0 to 2" in err[0]
    status, _, err = run_main(capsys, [*paths, "--target", "nan", *out])
    assert status == 2 and err == ["compare.py: error: --target nan is not a finite loss; pass e.g. --target 3.0"]
    # two runs with the same name: a name is ambiguous, a position is not
    twin = write_log(str(tmp_path / "twin"), [config_line("sophia", "sophiag"), eval_line(0, 5.0)])
    status, _, err = run_main(capsys, [paths[0], twin, "--baseline", "sophia", *out])
    assert status == 2 and "names 2 runs; pass its position" in err[0]
    assert run_main(capsys, [paths[0], twin, "--baseline", "1", *out])[0] == 0


def test_cli_runs_without_val_loss(tmp_path, capsys):
    paths = write_study(tmp_path)
    no_eval = write_log(str(tmp_path / "out-train-only"),
                        [config_line("train-only", "sophiag")] + [train_line(i, 5.0) for i in (0, 10)])
    out = ["--out", str(tmp_path / "plots")]
    # named in a note, the others still compared and plotted
    status, stdout, err = run_main(capsys, [*paths, no_eval, *out])
    assert status == 0
    assert err == ["compare.py: note: run 'train-only' logged no val loss: it is left out of the "
                   "val-loss plot and shows — in the table"]
    assert next(line for line in stdout.splitlines() if line.startswith("train-only")).split().count("—") == 8
    assert os.path.exists(str(tmp_path / "plots_val_loss.png"))
    # as the baseline it cannot define a target
    status, _, err = run_main(capsys, [*paths, no_eval, "--baseline", "train-only", *out])
    assert status == 2 and err == ["compare.py: error: baseline run 'train-only' logged no val loss; "
                                   "pick another with --baseline"]
    # nothing to compare at all
    status, _, err = run_main(capsys, [no_eval, *out])
    assert status == 2 and "no run logged a val loss" in err[0]


# -----------------------------------------------------------------------------
# wandb offline runs

WANDB_SCRIPT = """
import wandb
run = wandb.init(project="compare-test", name="sophia-wandb", config={"optimizer": "sophiag", "rho": 0.05})
for i in range(0, 300, 10):
    row = {"iter": i, "tokens": i * 1000, "time": 1.5 * i, "loss": 6.0 - i / 100, "lr": 6e-4,
           "mfu": float("nan"), "train/win_rate": 0.3}
    run.log(row)
    if i % 100 == 0:
        run.log({"iter": i, "tokens": i * 1000, "time": 1.5 * i, "train/loss": 6.0 - i / 100,
                 "val/loss": 6.0 - i / 100, "lr": 6e-4})
# enough rows to fill more than one 32 KiB block, so records are split across blocks
for i in range(300, 800, 1):
    run.log({"iter": i, "tokens": i * 1000, "time": 1.5 * i, "loss": 3.0, "lr": 6e-4, "pad": "x" * 50})
run.log({"iter": 800, "tokens": 800000, "time": 1200.0, "train/loss": 2.5, "val/loss": 2.5, "lr": 6e-4})
run.finish()
"""


@pytest.fixture(scope="module")
def wandb_run_folder(tmp_path_factory):
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb-offline")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(root / "config"), WANDB_CACHE_DIR=str(root / "cache"),
               WANDB_DATA_DIR=str(root / "data"), WANDB_CONSOLE="off")
    subprocess.run([sys.executable, "-c", WANDB_SCRIPT], env=env, cwd=str(root), check=True, timeout=120)
    folders = [name for name in os.listdir(root / "wandb") if name.startswith("offline-run-")]
    assert len(folders) == 1
    return str(root / "wandb" / folders[0])


def test_wandb_offline_run(wandb_run_folder):
    wandb_file = next(name for name in os.listdir(wandb_run_folder) if name.endswith(".wandb"))
    assert os.path.getsize(os.path.join(wandb_run_folder, wandb_file)) > 2 * compare.WANDB_BLOCK_SIZE
    for path in [wandb_run_folder, os.path.join(wandb_run_folder, wandb_file)]:
        run = compare.load_run(path)
        assert run.name == "sophia-wandb" and run.optimizer == "sophiag"
        assert run.config == {"optimizer": "sophiag", "rho": 0.05}
        assert [(row["iter"], row["val/loss"]) for row in run.eval] == [
            (0, 6.0), (100, 5.0), (200, 4.0), (800, 2.5)]
        assert [row["iter"] for row in run.train] == list(range(0, 300, 10)) + list(range(300, 800))
        assert all("mfu" not in row and "pad" not in row for row in run.train)  # NaN and text dropped
        # the train plot draws the logged per-interval loss, not the evals' train/loss
        train_ys = panel_curves(compare.loss_figure([run], "train"))[0]["sophia-wandb (sophiag)"][1]
        assert train_ys == pytest.approx([6.0 - i / 100 for i in range(0, 300, 10)] + [3.0] * 500)
        assert compare.iters_to_target(run, 4.5) == pytest.approx(150.0)
        assert compare.seconds_to_target(run, 4.5) == pytest.approx(225.0)


def test_wandb_log_cut_short_keeps_what_was_written(wandb_run_folder, tmp_path):
    wandb_file = next(name for name in os.listdir(wandb_run_folder) if name.endswith(".wandb"))
    with open(os.path.join(wandb_run_folder, wandb_file), "rb") as f:
        data = f.read()
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(data[:compare.WANDB_BLOCK_SIZE + 100])  # killed mid-record in the second block
    run = compare.load_run(str(cut))
    assert [row["iter"] for row in run.eval][:3] == [0, 100, 200] and len(run.eval) == 3
    assert 300 < run.train[-1]["iter"] < 799
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(compare.CompareError, match="is not a wandb transaction log"):
        compare.load_run(str(bad))
