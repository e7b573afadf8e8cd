"""The one reader of a run's log.txt, for the tools (plot_runs.py, push_to_hub.py, bench/) and the tests.

A run prints every line into its log. The lines this module reads are space-separated key:value pairs:

    script:17-add-lm-head-logit-softcap.py                                   header (before the first step line)
    device:cuda:0 gpu:NVIDIA H100 80GB HBM3 torch:2.11.0 world_size:1        a value may hold spaces
    step:12/50 loss:6.123456 lr:5.9000e-04 grad_norm:1.2345 dt:123.4ms tok/s:12345 tokens:6291456 train_time:1234ms
    step:50/50 val_loss:3.21 val_ppl:24.8 tokens:26214400 train_time:96300ms
    step:50/50 hellaswag_acc:0.2512 hellaswag_correct:2523 hellaswag_total:10042
    step:50/50 sample:0 text:...
    done steps:50 tokens:26214400 train_time:96300ms peak_mem:64098MiB

Lines are read by key: keys a later script adds (eta:, mfu:, ...) are kept, and lines that are not run output
(the script's source, a traceback, a sample's free text) are skipped. A line that does not start with a letter
(whitespace, "| ", "======") is never run output.
"""
import math
import re

# A key is a name, optionally with a "/" (tok/s). Words without a key of their own belong to the value before
# them, so "gpu:NVIDIA H100 80GB HBM3" keeps its spaces.
KEY = re.compile(r"^([A-Za-z_][\w/]*):(.*)$")
NUMBER = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)([A-Za-z%]*)$")
STEP = re.compile(r"^(\d+)(?:/(\d+))?$")
MILLISECONDS_PER = {"ms": 1.0, "s": 1e3, "min": 6e4, "h": 3.6e6}  # durations are read in ms, whatever the unit
# Which list a step line goes to: the first of these keys on the line (so a sample's text that holds "loss:"
# after its sample: key cannot make it a train line).
KIND_OF = {"loss": "train", "val_loss": "val", "hellaswag_acc": "hellaswag", "sample": "samples"}


def parse_pairs(line):
    """'step:3/10 loss:6.1 gpu:NVIDIA H100' -> {'step': '3/10', 'loss': '6.1', 'gpu': 'NVIDIA H100'} (strings).
    Words before the first key are dropped. A line that does not start with a letter is not run output ({}): an
    indented sample text or traceback, or a run record's "| " source lines and "======" markers (step 29)."""
    if not line[:1].isalpha():
        return {}
    pairs, key = {}, None
    for word in line.split():
        match = KEY.match(word)
        if match:
            key = match.group(1)
            pairs[key] = match.group(2)
        elif key is not None:
            pairs[key] += " " + word
    return pairs


def value(text):
    """A logged value as a number where it is one: '6.12' -> 6.12, 'nan' -> nan (a diverged loss), '1234MiB' ->
    1234.0, '41.5%' -> 41.5, durations in ms ('123.4ms' -> 123.4, '2s' -> 2000.0); anything else stays the string
    it was."""
    match = NUMBER.match(text)
    if not match:
        return text
    number, unit = float(match.group(1)), match.group(2)
    return number * MILLISECONDS_PER[unit] if unit in MILLISECONDS_PER else number


def number(item):
    """A logged value (a string, or a row's entry) as a float when it is a number, else None (missing, text)."""
    result = value(item) if isinstance(item, str) else item
    return float(result) if isinstance(result, (int, float)) and not isinstance(result, bool) else None


def read_rows(path):
    """The key:value pairs of every line of a log file, one dict per line ({} for a line without pairs)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [parse_pairs(line) for line in f]


def _lines(source):
    if isinstance(source, str):
        with open(source, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    return list(source)


def _append(rows, row):
    """Add one step record. A step not after the last one means the run was resumed from an earlier checkpoint
    and logged those steps again: the new records replace the old ones from that step on."""
    while rows and rows[-1]["step"] >= row["step"]:
        rows.pop()
    rows.append(row)


def parse_log(source):
    """Read a log (a path, or an iterable of lines) into plain Python values:

    {
      "header":    {key: str},    # script, run_dir, device, gpu, torch, world_size, model_params, ... (first wins)
      "train":     [row, ...],    # one per train step line: {"step", "of", "loss", "lr", "dt", "tokens", ...}
      "val":       [row, ...],    # one per val_loss line
      "hellaswag": [row, ...],    # one per hellaswag_acc line
      "samples":   [row, ...],    # one per sample line
      "done":      row or None,   # the done line; None when the run did not finish
    }
    A row holds every key of its line through value() (numbers, durations in ms), "step" as an int and "of" the
    step count after the slash (None without one). Rows of a kind are in step order (see _append).
    """
    log = {"header": {}, "train": [], "val": [], "hellaswag": [], "samples": [], "done": None}
    seen_step = False
    for line in _lines(source):
        line = line.rstrip("\r\n")
        if not line or line[0].isspace():
            continue
        if line.startswith("done "):
            log["done"] = {key: value(text) for key, text in parse_pairs(line[len("done "):]).items()}
            continue
        first = KEY.match(line.split(" ", 1)[0])
        if first is None or not first.group(2):
            continue  # prose, source code ("else:"), a sample's text ("ROMEO:")
        pairs = parse_pairs(line)
        if first.group(1) != "step":
            if not seen_step:
                for key, text in pairs.items():
                    log["header"].setdefault(key, text)
            continue
        step = STEP.match(pairs["step"])
        if step is None:
            continue
        seen_step = True
        kind = next((KIND_OF[key] for key in pairs if key in KIND_OF), None)
        if kind is None:
            continue  # a step line of a kind this reader does not know yet
        row = {key: value(text) for key, text in pairs.items() if key != "step"}
        row["step"] = int(step.group(1))
        row["of"] = int(step.group(2)) if step.group(2) else None
        _append(log[kind], row)
    return log


def step_values(source, key):
    """{step: number} of `key` over every step line that holds it (train, val, hellaswag), the last line of a
    step winning (a resumed run logs some steps twice)."""
    values = {}
    for line in _lines(source):
        if not line.startswith("step:"):
            continue
        pairs = parse_pairs(line)
        step = STEP.match(pairs["step"])
        if step and key in pairs and number(pairs[key]) is not None:
            values[int(step.group(1))] = number(pairs[key])
    return values


def column(rows, key):
    """[row[key], ...] as floats, nan where a row lacks the key or it is not a number (for plotting)."""
    return [math.nan if number(row.get(key)) is None else number(row.get(key)) for row in rows]
