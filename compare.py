"""
Compare training runs the way the Sophia question is asked: does Sophia-G (or Muon) reach a given
validation loss in fewer iterations, tokens and seconds than a tuned AdamW? Any number of runs of
any of the three optimizers, in one table and one set of plots.

    python compare.py out-sophiag-small out-adam-small-lr6e-4 out-adam-small-lr1e-3
    python compare.py RUN [RUN ...] [--baseline NAME_OR_INDEX] [--target LOSS] [--out out-compare/]

A RUN is a run's out_dir (or the metrics.jsonl inside it), or a wandb offline run folder
(wandb/offline-run-YYYYMMDD_HHMMSS-<id>/, or the run-<id>.wandb file in it).

It writes two PNGs (val loss and train loss, each against iterations, tokens and wall-clock
seconds; a third, HellaSwag's acc_norm, where runs scored it with --hellaswag=True) and prints a
table (with the final HellaSwag acc_norm where a run has one): final and best val loss, the iterations / tokens / seconds each run
needs to reach a target val loss, and the speed-up over the baseline run on each of those axes.
Every loss is the mean cross-entropy per token in nats (natural log), as the training scripts log
it. The train loss plotted is the logged `loss` of the train rows (the mean over the iterations
of each log interval), not the eval's estimate on eval_iters batches. Runs are labelled by their
run name, or by their out_dir where several share one (a config run with different overrides).

The baseline defaults to the AdamW run with the lowest val loss (the tuned one, when several
AdamW learning rates were tried), else the first run; the target defaults to the baseline's best
val loss. "Reaching" the target is the first crossing of the val-loss curve: linear interpolation
between the last eval point above the target and the first one at or below it (on each axis
separately), so evals every 1000 iterations do not round a crossing up to the next eval.

Everything below is importable (no side effects at import) for a study script:
load_run, iters_to_target / tokens_to_target / seconds_to_target, run_labels, comparison_table,
format_table, loss_figure, plot_runs.
"""

import argparse
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

# the three axes every comparison is made on: (row key, axis label)
AXES = [("iter", "iterations"), ("tokens", "tokens"), ("time", "wall-clock seconds")]
# keys the training scripts log (metrics.jsonl and wandb alike): the eval's val loss, and the train
# rows' loss, the mean over the iterations since the previous train row. The eval rows' train/loss
# (measured on eval_iters batches at the eval) is not used: the train rows are denser and what
# the optimizer actually saw.
VAL_LOSS, TRAIN_LOSS = "val/loss", "loss"
# HellaSwag's accuracy, in the eval rows of runs trained with --hellaswag=True
HELLASWAG = "hellaswag/acc_norm"
# what every loss here is, stated once per table and per plot
LOSS_UNITS = "mean cross-entropy per token, in nats (natural log)"


class CompareError(ValueError):
    """A problem with the user's input: printed as one line, exit status 2."""


@dataclass
class Run:
    name: str  # run_name from the config, else the folder name
    optimizer: str  # "sophiag", "adamw", "muon", or "unknown" when the log does not say
    config: dict  # the resolved training config (the last one logged, after resumes)
    train: list = field(default_factory=list)  # train rows, one per iteration, sorted by "iter"
    eval: list = field(default_factory=list)  # eval rows, one per iteration, sorted by "iter"
    path: str = ""  # the file it was read from

    def val_points(self):
        return [row for row in self.eval if VAL_LOSS in row]


# -----------------------------------------------------------------------------
# reading runs

def _numbers_only(row):
    # null / NaN / inf / strings are dropped key by key, so a row with mfu = null (CPU) or a
    # non-finite loss still contributes its other values
    return {key: value for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def _append_row(rows, row):
    # rows arrive in log order. A row at or before the last one kept means the run was resumed
    # from an earlier checkpoint: everything the abandoned continuation logged from that
    # iteration on is superseded (a later line for the same iteration wins, and so do stale
    # lines beyond it that the resumed run has not re-logged yet). Keeps rows sorted by iter.
    while rows and rows[-1]["iter"] >= row["iter"]:
        rows.pop()
    rows.append(row)


def _add_row(run, kind, raw):
    row = _numbers_only(raw)
    if "iter" not in row:
        return  # a row that cannot be placed on the curve
    if kind == "eval":
        _append_row(run.eval, row)
    elif kind == "train":
        _append_row(run.train, row)


def _infer_optimizer(run):
    optimizer = run.config.get("optimizer")
    if isinstance(optimizer, str):
        return optimizer
    # only Sophia runs log their win rate (the fraction of coordinates not clipped)
    if any("train/win_rate" in row for row in run.train):
        return "sophiag"
    return "unknown"


def _read_jsonl(path, folder_name):
    run = Run(name=folder_name, optimizer="unknown", config={}, path=path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise CompareError(f"{path} is not a text metrics log; pass a run's out_dir, "
                           "its metrics.jsonl, or a wandb offline-run-* folder") from None
    if not any(line.strip() for line in lines):
        raise CompareError(f"{path} is empty: the run has not logged anything yet")
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # json reads NaN / Infinity as floats, as json.dumps writes them
        except json.JSONDecodeError as e:
            raise CompareError(f"{path}:{line_number}: malformed JSON ({e.msg}); "
                               "fix or delete that line") from None
        if not isinstance(record, dict):
            raise CompareError(f"{path}:{line_number}: expected a JSON object, got "
                               f"{type(record).__name__}; fix or delete that line")
        kind = record.get("kind")
        if kind == "config":
            # a config line starts the log and is repeated at each resume: the last one wins
            if isinstance(record.get("config"), dict):
                run.config = record["config"]
            if isinstance(record.get("run_name"), str) and record["run_name"]:
                run.name = record["run_name"]
            if isinstance(record.get("optimizer"), str):
                run.optimizer = record["optimizer"]
        else:
            _add_row(run, kind, record)
    if run.optimizer == "unknown":
        run.optimizer = _infer_optimizer(run)
    return run


# A .wandb file is wandb's transaction log, in LevelDB's log format: a 7-byte file header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks. Each chunk has a 7-byte header
# (CRC-32 of type byte + data, little-endian; data length, uint16; type) and a record is one FULL
# chunk or FIRST, MIDDLE..., LAST chunks split at block ends. Less than 7 bytes left in a block are
# zero padding. Each record is a protobuf wandb.proto.wandb_internal_pb2.Record.
# wandb 0.31 writes and reads the file in its Go core (wandb-core) and no longer ships a Python
# reader, so the framing is read here and the records are decoded with wandb's own protobuf.
WANDB_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
WANDB_BLOCK_SIZE = 32768
WANDB_CHUNK_HEADER_SIZE = 7
WANDB_FULL, WANDB_FIRST, WANDB_MIDDLE, WANDB_LAST = 1, 2, 3, 4


def read_wandb_records(path):
    """Yield the serialized records of a .wandb transaction log, in order. Stops quietly at a
    truncated or corrupt chunk (a run killed mid-write), keeping everything before it."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(WANDB_FILE_HEADER):
        raise CompareError(f"{path} is not a wandb transaction log (bad file header); "
                           "pass a run-<id>.wandb file or its offline-run-* folder")
    position, pending = len(WANDB_FILE_HEADER), None
    while position + WANDB_CHUNK_HEADER_SIZE <= len(data):
        left_in_block = WANDB_BLOCK_SIZE - position % WANDB_BLOCK_SIZE
        if left_in_block < WANDB_CHUNK_HEADER_SIZE:
            position += left_in_block  # block trailer
            continue
        checksum, length, chunk_type = struct.unpack_from("<IHB", data, position)
        start = position + WANDB_CHUNK_HEADER_SIZE
        chunk = data[start:start + length]
        if chunk_type == 0 and length == 0:
            position += left_in_block  # zero-filled rest of a block
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([chunk_type]))) != checksum:
            return
        position = start + length
        if chunk_type == WANDB_FULL:
            yield chunk
        elif chunk_type == WANDB_FIRST:
            pending = [chunk]
        elif chunk_type in (WANDB_MIDDLE, WANDB_LAST) and pending is not None:
            pending.append(chunk)
            if chunk_type == WANDB_LAST:
                yield b"".join(pending)
                pending = None
        else:
            return  # a continuation without its start: the log is damaged from here on


def _wandb_items(items):
    # history and config items carry a flat key, or a nested_key for logged dicts
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        try:
            out[key] = json.loads(item.value_json)
        except json.JSONDecodeError:
            pass  # a value wandb serialized some other way (media, tables): not a number anyway
    return out


def _read_wandb(path, folder_name):
    # imported here: importing wandb costs about a second, which jsonl users should not pay
    from wandb.proto import wandb_internal_pb2

    run = Run(name=folder_name, optimizer="unknown", config={}, path=path)
    display_name, history_rows = "", 0
    for serialized in read_wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(serialized)
        record_type = record.WhichOneof("record_type")
        if record_type == "run":
            display_name = record.run.display_name or display_name
            run.config.update(_wandb_items(record.run.config.update))
        elif record_type == "config":
            run.config.update(_wandb_items(record.config.update))
        elif record_type == "history":
            # wandb rows have no "kind": a row with val/loss is an eval row, one with loss a train row
            row = _wandb_items(record.history.item)
            history_rows += 1
            if VAL_LOSS in row:
                _add_row(run, "eval", row)
            if TRAIN_LOSS in row:
                _add_row(run, "train", row)
    if history_rows == 0:
        raise CompareError(f"{path} holds no logged rows (wandb.log was never called); "
                           "pass a run that has trained for at least one log interval")
    run.config.pop("_wandb", None)  # wandb's own bookkeeping
    run.name = run.config.get("run_name") or display_name or folder_name
    run.optimizer = _infer_optimizer(run)
    return run


def load_run(path):
    """Read one run: an out_dir holding metrics.jsonl, a metrics.jsonl file, a wandb offline run
    folder, or its run-<id>.wandb file. Raises CompareError with a one-line message."""
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise CompareError(f"{path} does not exist; pass a run's out_dir, its metrics.jsonl, "
                           "or a wandb offline-run-* folder")
    if os.path.isdir(path):
        folder = path
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            path = os.path.join(path, "metrics.jsonl")
        else:
            wandb_files = sorted(name for name in os.listdir(path) if name.endswith(".wandb"))
            if len(wandb_files) != 1:
                raise CompareError(f"{path} holds no metrics.jsonl and {len(wandb_files)} .wandb "
                                   "files; pass a run's out_dir or one wandb offline-run-* folder")
            path = os.path.join(path, wandb_files[0])
    else:
        folder = os.path.dirname(os.path.abspath(path))
    folder_name = os.path.basename(os.path.abspath(folder))
    if path.endswith(".wandb"):
        run = _read_wandb(path, folder_name)
    else:
        run = _read_jsonl(path, folder_name)
    if not run.train and not run.eval:
        raise CompareError(f"{path} holds no train or eval rows with an 'iter'; "
                           "let the run train past its first log interval")
    return run


# -----------------------------------------------------------------------------
# reaching a target loss

def to_target(run, target, axis="iter"):
    """The amount of `axis` ("iter", "tokens" or "time") the run spends before its val loss first
    reaches `target`: linear interpolation between the last eval point above the target and the
    first at or below it; that first point itself when no point precedes it. None if the run
    never reaches the target (or logged no val loss with this axis)."""
    points = [(row[axis], row[VAL_LOSS]) for row in run.val_points() if axis in row]
    for i, (x, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return float(x)
            previous_x, previous_loss = points[i - 1]
            fraction = (previous_loss - target) / (previous_loss - loss)
            return previous_x + fraction * (x - previous_x)
    return None


def iters_to_target(run, target):
    return to_target(run, target, "iter")


def tokens_to_target(run, target):
    return to_target(run, target, "tokens")


def seconds_to_target(run, target):
    return to_target(run, target, "time")


def best_val_loss(run):
    losses = [row[VAL_LOSS] for row in run.val_points()]
    return min(losses) if losses else None


def final_val_loss(run):
    points = run.val_points()
    return points[-1][VAL_LOSS] if points else None


def final_hellaswag(run):
    """The last logged HellaSwag acc_norm, None where the run scored none."""
    points = [row[HELLASWAG] for row in run.eval if HELLASWAG in row]
    return points[-1] if points else None


def pick_baseline(runs, name_or_index=None):
    """The run named (or at that 0-based position in `runs`); by default the AdamW run with the
    lowest val loss (the tuned one in a learning-rate sweep), else the first run."""
    if name_or_index is None:
        adamw = [run for run in runs if run.optimizer == "adamw" and best_val_loss(run) is not None]
        return min(adamw, key=best_val_loss) if adamw else runs[0]
    matches = [run for run in runs if run.name == str(name_or_index)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CompareError(f"baseline {name_or_index!r} names {len(matches)} runs; "
                           "pass its position instead (--baseline 0 is the first RUN)")
    if str(name_or_index).isdigit() and int(name_or_index) < len(runs):
        return runs[int(name_or_index)]
    names = ", ".join(repr(run.name) for run in runs)
    raise CompareError(f"baseline {name_or_index!r} matches no run; "
                       f"pass one of {names} or a position from 0 to {len(runs) - 1}")


def run_labels(runs):
    """One label per run, all distinct, for table rows and legends. A run's name when no other run
    has it; runs sharing a name (one config, different --key=value overrides) are told apart by
    their out_dir's folder name, or by as many of its trailing folders as that takes. A label still
    repeated (the same folder passed twice) gets the run's position among `runs`."""
    labels = [run.name for run in runs]
    # the folder a run was read from: its out_dir, or its wandb offline-run-* folder
    folders = [os.path.dirname(os.path.abspath(run.path)).split(os.sep) for run in runs]
    for name in set(labels):
        group = [i for i, label in enumerate(labels) if label == name]
        if len(group) == 1:
            continue
        for i in group:
            # the fewest trailing folders that no other folder of the group ends with; a label with
            # more folders than another cannot equal it, so the group's labels are all distinct
            others = [folders[j] for j in group if folders[j] != folders[i]]
            depth = next(d for d in range(1, len(folders[i]) + 1)
                         if all(other[-d:] != folders[i][-d:] for other in others))
            labels[i] = "/".join(folders[i][-depth:])
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label} [{i}]" if label in repeated else label for i, label in enumerate(labels)]


def comparison_table(runs, baseline=None, target=None):
    """One dict per run: its label (run_labels), optimizer, final / best val loss, iterations /
    tokens / seconds to reach `target`, and speed-ups (baseline's amount / the run's amount) on
    each axis. None where a run has no val loss or never reaches the target. `baseline` is a Run,
    a name, a position, or None (see pick_baseline); `target` defaults to the baseline's best val
    loss."""
    if not isinstance(baseline, Run):
        baseline = pick_baseline(runs, baseline)
    labels = run_labels(runs)
    baseline_label = next((label for run, label in zip(runs, labels) if run is baseline), baseline.name)
    if best_val_loss(baseline) is None:
        raise CompareError(f"baseline run {baseline_label!r} logged no val loss; "
                           "pick another with --baseline")
    if target is None:
        target = best_val_loss(baseline)
    baseline_amounts = {axis: to_target(baseline, target, axis) for axis, _ in AXES}
    rows = []
    for run, label in zip(runs, labels):
        row = {"run": label, "optimizer": run.optimizer, "is_baseline": run is baseline,
               "baseline": baseline_label, "target": target,
               "final_val_loss": final_val_loss(run), "best_val_loss": best_val_loss(run),
               "final_hellaswag": final_hellaswag(run)}
        for axis, name in [("iter", "iters"), ("tokens", "tokens"), ("time", "seconds")]:
            amount = to_target(run, target, axis)
            row[f"{name}_to_target"] = amount
            # a run already at the target at its first eval (amount 0) has no meaningful ratio
            reached_by_both = amount and baseline_amounts[axis] is not None
            row[f"speedup_{name}"] = baseline_amounts[axis] / amount if reached_by_both else None
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# presenting

def _si(value):
    for factor, suffix in [(1e9, "B"), (1e6, "M"), (1e3, "k")]:
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _duration(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


COLUMNS = [  # (row key, header, formatter)
    ("run", "run", str),
    ("optimizer", "optimizer", str),
    ("final_val_loss", "final val (nats)", "{:.4f}".format),
    ("best_val_loss", "best val (nats)", "{:.4f}".format),
    ("iters_to_target", "iters to target", lambda v: f"{round(v):,}"),
    ("tokens_to_target", "tokens to target", _si),
    ("seconds_to_target", "time to target", _duration),
    ("speedup_iters", "speed-up iters", "{:.2f}x".format),
    ("speedup_tokens", "speed-up tokens", "{:.2f}x".format),
    ("speedup_seconds", "speed-up time", "{:.2f}x".format),
]
# shown where a run scored HellaSwag
HELLASWAG_COLUMN = ("final_hellaswag", "HellaSwag acc_norm", "{:.4f}".format)


def format_table(rows, markdown=False):
    """The rows of comparison_table as fixed-width text, or as a Markdown table (for a README),
    followed by one line that states what the losses are, the target and how reaching it is
    measured."""
    columns = COLUMNS + ([HELLASWAG_COLUMN] if any(row.get("final_hellaswag") is not None for row in rows) else [])
    headers = [header for _, header, _ in columns]
    cells = [["—" if row.get(key) is None else fmt(row[key]) for key, _, fmt in columns] for row in rows]
    for row, texts in zip(rows, cells):
        if row["is_baseline"]:
            texts[0] += " *"
    note = ""
    if rows:
        note = (f"loss = {LOSS_UNITS}; target: val loss {rows[0]['target']:.4f}; "
                f"* = baseline ({rows[0]['baseline']}); "
                "speed-up = baseline's amount / run's amount; reached = first crossing, linearly "
                "interpolated between evals; — = never reached / not logged")
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join(":---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    else:
        widths = [max(len(text) for text in column) for column in zip(headers, *cells)]
        def line(texts):  # text columns left-aligned, numbers right-aligned
            return "  ".join(t.ljust(w) if i < 2 else t.rjust(w)
                             for i, (t, w) in enumerate(zip(texts, widths))).rstrip()
        lines = [line(headers), line(["-" * w for w in widths])] + [line(row) for row in cells]
    return "\n".join(lines + ([""] if markdown and note else []) + ([note] if note else []))


def _y_limits(curves):
    # (low, high) for curves [(xs, ys), ...], none empty. The first evals of a from-scratch run
    # sit near ln(50257) = 10.8 and would flatten the part worth seeing: the upper limit ignores
    # the first 5% of each curve's x-range
    kept, every = [], []
    for xs, ys in curves:
        every += ys
        start = xs[0] + 0.05 * (xs[-1] - xs[0])
        kept += [y for x, y in zip(xs, ys) if x > start]
    kept = kept or every
    low, high = min(every), max(kept)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.1
    return low - margin, high + margin


LINE_STYLES = {"sophiag": "-", "adamw": "--", "muon": "-."}  # other optimizers dotted
# each plot: (the Run attribute holding its rows, the key in them, name, what it is, its unit)
PLOTS = {
    "val": ("eval", VAL_LOSS, "val loss", f"{LOSS_UNITS}, on the same eval_iters batches at every eval",
            "nats"),
    "train": ("train", TRAIN_LOSS, "train loss", f"{LOSS_UNITS}, averaged over each log interval's iterations",
              "nats"),
    "hellaswag": ("eval", HELLASWAG, "HellaSwag acc_norm", "the fraction of its validation items whose "
                  "right ending has the lowest mean cross-entropy (chance: 0.25)", "fraction"),
}


def loss_figure(runs, which, target=None, log_x=False, title=None, target_label=None):
    """The figure of the `which` ("val" or "train") loss, or of HellaSwag ("hellaswag"), three
    panels: against iterations, tokens and wall-clock seconds, one curve per run labelled as in
    run_labels (Sophia solid, AdamW dashed, Muon dash-dotted). A dotted line marks `target`,
    labelled `target_label` (default: its value). None when no run has a point to plot."""
    rows_attribute, y_key, name, what, unit = PLOTS[which]
    labels = run_labels(runs)
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    panels = figure.subplots(1, len(AXES))
    plotted = False
    for panel, (x_key, x_label) in zip(panels, AXES):
        curves = []
        for i, (run, label) in enumerate(zip(runs, labels)):
            rows = getattr(run, rows_attribute)
            points = [(row[x_key], row[y_key]) for row in rows if x_key in row and y_key in row]
            if not points:
                continue
            xs, ys = [x for x, _ in points], [y for _, y in points]
            curves.append((xs, ys))
            if run.optimizer != "unknown" and run.optimizer not in label.lower():
                label = f"{label} ({run.optimizer})"
            # color by position among the runs, so a run keeps its color in every panel
            panel.plot(xs, ys, LINE_STYLES.get(run.optimizer, ":"), color=f"C{i % 10}", label=label)
        if not curves:
            panel.text(0.5, 0.5, f"no run logged {x_label}", ha="center", transform=panel.transAxes)
            continue
        plotted = True
        if target is not None:
            panel.axhline(target, color="gray", linewidth=0.8, linestyle=":",
                          label=target_label or f"target: val loss {target:.4f}")
        low, high = _y_limits(curves)
        if target is not None:  # keep the target line in view, even when no run gets near it
            low, high = min(low, target - 0.02 * (high - low)), max(high, target)
        panel.set_ylim(low, high)
        if log_x:
            panel.set_xscale("log", nonpositive="mask")  # iteration 0 has no place on a log axis
            panel.xaxis.set_minor_formatter(NullFormatter())  # labels on 2x, 3x... overlap
        panel.set_xlabel(x_label)
        panel.set_ylabel(f"{name} ({unit})")
        panel.grid(alpha=0.3)
        # losses fall and accuracies rise: the corner the late, flat part leaves empty, not the
        # steep start that matplotlib's "best" often covers
        panel.legend(fontsize="small", loc="upper right" if unit == "nats" else "lower right")
    if not plotted:
        return None
    heading = f"{name}: {what}"
    figure.suptitle(f"{title}\n{heading}" if title else heading)
    return figure


def plot_runs(runs, out_prefix, target=None, log_x=False, title=None, target_label=None):
    """Write <out_prefix>_val_loss.png and <out_prefix>_train_loss.png (or val_loss.png and
    train_loss.png inside out_prefix when it is a folder): loss_figure of the val loss, with
    `target` marked, and of the train rows' loss; and <out_prefix>_hellaswag.png where a run
    scored HellaSwag. Returns the paths written."""
    if out_prefix.endswith(("/", os.sep)) or os.path.isdir(out_prefix):
        base = os.path.join(out_prefix, "")
    else:
        base = out_prefix + "_"
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    paths = []
    for name, figure in [("val_loss", loss_figure(runs, "val", target, log_x, title, target_label)),
                         ("train_loss", loss_figure(runs, "train", None, log_x, title)),
                         ("hellaswag", loss_figure(runs, "hellaswag", None, log_x, title))]:
        if figure is not None:  # a plot no run has points for is not written
            figure.savefig(base + f"{name}.png", dpi=100)
            paths.append(base + f"{name}.png")
    return paths


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run's out_dir or metrics.jsonl, or a wandb offline-run-* folder")
    parser.add_argument("--baseline", default=None, metavar="NAME_OR_INDEX",
                        help="the run the speed-ups are measured against: its name or its position "
                             "among the RUNs from 0 (default: the AdamW run with the lowest val loss)")
    parser.add_argument("--target", type=float, default=None, metavar="LOSS",
                        help="the val loss to reach (default: the baseline's best val loss)")
    parser.add_argument("--out", default="out-compare/",
                        help="prefix of the PNG files written, or a folder ending in / "
                             "(default: out-compare/, which git ignores)")
    parser.add_argument("--title", default=None, help="title above the plots")
    parser.add_argument("--log-x", action="store_true", help="logarithmic x axes")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    try:
        if args.target is not None and not math.isfinite(args.target):
            raise CompareError(f"--target {args.target} is not a finite loss; pass e.g. --target 3.0")
        runs = [load_run(path) for path in args.runs]
        without_val = [label for run, label in zip(runs, run_labels(runs)) if best_val_loss(run) is None]
        if len(without_val) == len(runs):
            raise CompareError("no run logged a val loss (no eval rows with val/loss); "
                               "let the runs train past their first eval interval")
        rows = comparison_table(runs, args.baseline, args.target)
        for name in without_val:
            print(f"compare.py: note: run {name!r} logged no val loss: it is left out of the "
                  "val-loss plot and shows — in the table", file=sys.stderr)
        print(format_table(rows, markdown=args.markdown))
        target = rows[0]["target"]
        if args.target is None:
            target_label = f"target: best val loss of {rows[0]['baseline']} = {target:.4f}"
        else:
            target_label = f"target: val loss {target:.4f} (--target)"
        for path in plot_runs(runs, args.out, target=target, log_x=args.log_x, title=args.title,
                              target_label=target_label):
            print(f"wrote {path}")
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
