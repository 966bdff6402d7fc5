"""Data preparation at scale: seeded conversations (10k / 100k / 1M) through `deltatune train` and `deltatune lint`.

    python benchmarks/data_scale.py                                          # 10k, 100k, 1M; JSONL and parquet
    python benchmarks/data_scale.py --sizes 2000,20000 --formats jsonl       # a quick check (~6 min)
    python benchmarks/data_scale.py --out /tmp/scale --json scale.json       # keep (and reuse) the data files
    python benchmarks/data_scale.py --sizes 10000 --generate-only --out DIR  # only write the files

The generator writes OpenAI `messages` records (an optional system prompt, then user/assistant;
~80 tokens a conversation as the model sees it, 30-300, about 5% with 2-3 exchanges) in batches,
as JSONL and as parquet (a `messages` column of list<struct<role, content>>); the same seed
writes the same records in both. Files are named by size and seed, so an `--out` folder reuses them.

Per size × format, each in its own child process (`python -m deltatune ...`), in this order:
`lint` at its defaults but max_seq_length 256 (wall time, peak RSS; a lint that tokenises only a
sample of a big file, as `--sample` does, still reads all of it and searches it for duplicates);
`train` on a cold dataset cache with 1 process and with all (`dataset_num_proc`, where this
deltatune has the key); `train` again on the warm cache the last cold run left. Every train run:
SmolLM2-135M-Instruct (embedded), LoRA, float32, `validation_split: 0`, one optimizer step of 8
conversations, max_seq_length 256, no delta report.

- preparation: the `reading` and `tokenising` stage lines deltatune prints on stderr (0.1 s resolution).
- load: the gap between the two stages (model and tokenizer loading, the split).
- start → step 1: from starting the child to the step-1 record in metrics.jsonl (polled every 0.2 s).
- peak RSS: preparation = the process's VmHWM when the last tokenising stage ends (with worker
  processes: their sampled sum, where larger); training = the peak after that (VmHWM is reset
  there); whole = the kernel's rusage (os.wait4).
- data above model: the preparation peak minus that of the same run on 200 conversations (the
  model is loaded by then, and everything the data costs has been built). Not the whole-run peak:
  that is set by the first batch's padded length, which the shuffle picks differently for each
  size (the 200-conversation run alone peaks at 2.27-3.42 GB with seeds 0-2), so its difference
  (in brackets) says more about that batch than about the data.
"Cold" is an empty DELTATUNE_CACHE (and HF_DATASETS_CACHE, where parquet becomes Arrow) except the
converted model (linked in: its one-time GGUF conversion is not data preparation); "warm" is the
same folders again. Times are only clean on an idle machine: each run reports the cores other work
kept busy just before and during it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
REFERENCE_SIZE = 200  # conversations: the model's own footprint and start-up, with next to no data
BATCH = 10_000  # conversations generated and written at a time (1M never lives as Python objects at once)
POLL = 0.2  # seconds between looks at the child (RSS, metrics.jsonl)
BUSY = 0.3  # cores busy with other work before a run above which its times are flagged
TARGETS = {"prep_seconds": 300.0, "warm_first_step_seconds": 15.0, "data_rss_gb": 1.5, "growth": 1.1}
TARGET_SIZE = 1_000_000

# --- the generator --------------------------------------------------------------------------------

WORDS = ("apple river stone cloud lamp tiger violet garden engine copper winter market planet silver harbor "
         "candle forest bridge pepper rocket island meadow thunder velvet falcon marble ocean ladder cotton "
         "signal shadow crystal lemon orbit canyon feather anchor saddle willow the a of and to in is that it "
         "for on with as was at by this from or an be are have not but what all were when we there can your "
         "which their said if do will each about how up out them then she many some so these would other into "
         "has more her two like him see time could no make than first been its who now people my made over did "
         "down only way find use may water long little very after words called just where most know get through "
         "back much before go good new write our used me man too any day same right look think also around "
         "another came come work three must because does part even place well such here take why help put "
         "different away again off went old number great tell men say small every found still between name "
         "should home big give air line set own under read last never us left end along while might next sound "
         "below saw something thought both few those always show large often together asked house world going "
         "want school important until form food keep children feet land side without boy once animal life enough "
         "took four head above kind began almost live page got earth need far hand high year mother light country "
         "father let night picture being study second soon story since white ever paper hard near sentence better "
         "best across during today however sure knew try told young sun thing whole hear example heard several "
         "change answer room sea against top turned learn point city play toward five himself usually money seen "
         "car morning table system order account budget invoice shipment warehouse ticket refund customer").split()
SYSTEMS = ["You are a careful assistant.", "Answer with the words only, nothing else.",
           "You are a helpful assistant that follows instructions exactly and keeps answers short.",
           "You work in customer support for a shipping company; be polite and precise."]
MULTI_TURN = 0.05  # share of conversations with 2-3 user/assistant exchanges


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def exchange(rng: random.Random, scale: float) -> list[dict]:
    """One user turn and its answer; `scale` shortens the turns of a multi-turn conversation."""
    n = max(2, int(rng.lognormvariate(2.8, 0.6) * scale))  # median ~16 words, a long tail up to ~100
    task = rng.choice(["sort", "reverse", "count", "describe", "describe"])
    listing = words(rng, n)
    if task == "sort":
        prompt, answer = f"Sort these words alphabetically: {listing}", " ".join(sorted(listing.split()))
    elif task == "reverse":
        prompt, answer = f"Write these words in reverse order: {listing}", " ".join(reversed(listing.split()))
    elif task == "count":
        prompt, answer = f"How many words are in this list? {listing}", f"There are {n} words."
    else:
        topic = rng.choice(WORDS)
        prompt = f"Describe the {topic} in a few sentences, using these words: {listing}"
        answer = " ".join(f"{words(rng, rng.randint(4, 12)).capitalize()}." for _ in range(rng.randint(1, 4)))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    turns = rng.randint(2, 3) if rng.random() < MULTI_TURN else 1
    for _ in range(turns):
        messages += exchange(rng, 1 / turns)
    return {"messages": messages}


def write_data(folder: Path, n: int, seed: int, formats: list[str]) -> tuple[dict[str, Path], float | None]:
    """The files of `n` conversations (one per format) and the seconds it took; None: they were there."""
    paths = {fmt: folder / f"conversations-{n}-seed{seed}.{fmt}" for fmt in formats}
    if all(p.is_file() for p in paths.values()):
        return paths, None
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    start, rng = time.perf_counter(), random.Random(seed)
    tmp = {fmt: p.with_name(p.name + ".partial") for fmt, p in paths.items()}  # a killed run leaves no half file
    jsonl = tmp["jsonl"].open("w", encoding="utf-8") if "jsonl" in tmp else None
    parquet = pq.ParquetWriter(tmp["parquet"], schema) if "parquet" in tmp else None
    for first in range(0, n, BATCH):
        batch = [conversation(rng) for _ in range(min(BATCH, n - first))]
        if jsonl:
            jsonl.write("".join(json.dumps(r) + "\n" for r in batch))
        if parquet:
            parquet.write_table(pa.Table.from_pylist(batch, schema=schema))  # one row group per batch
    for handle in (jsonl, parquet):
        if handle:
            handle.close()
    for fmt, p in paths.items():
        os.replace(tmp[fmt], p)
    return paths, time.perf_counter() - start


# --- one child process, watched -------------------------------------------------------------------

STAGE = re.compile(r"^(?P<name>reading .+|tokenising \w+): (?:\d+ \w+ in )?(?P<seconds>[\d.]+) s(?: \(\d+/s\))?$")


def proc_kib(pid: int, field: str) -> int:
    """A /proc/PID/status figure (VmRSS, VmHWM) in KiB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_kib(pid: int) -> int:
    """RSS of the process and all its descendants (worker processes of a multi-process preparation)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += proc_kib(p, "VmRSS")
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux clear_refs 5), so training's peak is its own."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def busy_cores(seconds: float = 1.0) -> float:
    """Cores in use over the next `seconds`: with no child running, what other jobs take."""
    before = busy_seconds()
    time.sleep(seconds)
    return (busy_seconds() - before) / seconds


def step_one(metrics: Path) -> dict | None:
    """The step-1 training record of metrics.jsonl, once it is there."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if record.get("step") == 1 and "loss" in record and "event" not in record:
            return record
    return None


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return lines[-1] if lines else (err.strip().splitlines() or [""])[-1][-300:]


def measure(cmd: list[str], log: Path, env: dict, timeout: float, metrics: Path | None = None) -> dict:
    """Run `cmd` (stdout to log.out, stderr to log.err) and watch it: wall time, stage lines,
    the peaks before and after preparation, when step 1 was logged, and its exit."""
    stages: list[tuple[str, float, float]] = []  # (name, its seconds, when its line arrived)
    prep_hwm: list[int] = []  # VmHWM at the end of each tokenising stage; non-empty: preparation is over
    reset_ok = [True]
    busy_before = busy_cores()  # another job on the machine skews every time here: say so
    busy_start, start = busy_seconds(), time.perf_counter()
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        # Own session: a timeout kills the whole group, worker processes included.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env, start_new_session=True)

        def read_stderr() -> None:  # a thread, so each stage line is timed (and the peak read) as it arrives
            for raw in proc.stderr:
                err.write(raw)
                err.flush()
                match = STAGE.match(raw.decode(errors="replace").split("\r")[-1].strip())
                if not match:
                    continue
                name = "reading" if match["name"].startswith("reading ") else match["name"]
                if name.startswith("tokenising"):
                    kib = proc_kib(proc.pid, "VmHWM")
                    reset_ok[0] = reset_hwm(proc.pid) and reset_ok[0]
                    prep_hwm.append(kib)
                stages.append((name, float(match["seconds"]), time.perf_counter() - start))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        prep_tree = train_tree = train_hwm = step_rss = 0
        first_step, record, timed_out = None, None, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter() - start
            if now > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            if prep_hwm:
                train_tree, train_hwm = max(train_tree, tree_kib(proc.pid)), max(train_hwm, proc_kib(proc.pid, "VmHWM"))
            else:
                prep_tree = max(prep_tree, tree_kib(proc.pid))
            if metrics is not None and first_step is None and (record := step_one(metrics)):
                first_step, step_rss = now, tree_kib(proc.pid)  # after the step: its activations are freed
            time.sleep(POLL)
        wall = time.perf_counter() - start
        # What the machine did besides the child (and its workers): a busy neighbour shows up here.
        busy_during = (busy_seconds() - busy_start - usage.ru_utime - usage.ru_stime) / wall
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        reader.join(timeout=10)
    if metrics is not None and first_step is None and (record := step_one(metrics)):
        first_step = wall  # logged within the last poll before the exit: an upper bound
    peak = usage.ru_maxrss  # KiB on Linux; the largest of the process and its waited-for workers
    prep_peak = max([*prep_hwm, prep_tree]) if prep_hwm else None
    if prep_peak is None:
        train_peak = None
    elif peak > prep_peak:
        train_peak = peak  # the whole run's peak came after preparation
    else:
        train_peak = max(train_tree, train_hwm if reset_ok[0] else 0)
    text = log.with_suffix(".err").read_text(errors="replace")
    return {"cmd": cmd[2:], "log": str(log), "rc": proc.returncode, "timed_out": timed_out, "wall_s": wall,
            "busy_cores_before": busy_before, "busy_cores_during": busy_during,
            "stages": [list(s) for s in stages], **phases(stages, first_step),
            "first_step_s": first_step, "fit_step_one_s": (record or {}).get("elapsed_seconds"),
            "step_rss_gb": step_rss / 1e6 if step_rss else None, "peak_gb": peak / 1e6,
            "tree_peak_gb": max(prep_tree, train_tree) / 1e6,
            "prep_peak_gb": prep_peak / 1e6 if prep_peak is not None else None,
            "train_peak_gb": train_peak / 1e6 if train_peak is not None else None,
            "error": error_line(text) if proc.returncode else None, "unsupported": unsupported(proc.returncode, text)}


def phases(stages: list[tuple[str, float, float]], first_step: float | None) -> dict:
    """Start-up (to the first reading), preparation (reading + tokenising), the load between them, and
    what follows the preparation up to step 1, from the stage lines' seconds and arrival times."""
    reading = [s for s in stages if s[0] == "reading"]
    tokenising = [s for s in stages if s[0].startswith("tokenising")]
    if not reading or not tokenising:
        return {"startup_s": None, "prep_s": None, "load_s": None, "after_prep_s": None}
    prep_end = tokenising[-1][2]
    return {"startup_s": reading[0][2] - reading[0][1], "prep_s": sum(s[1] for s in reading + tokenising),
            "load_s": tokenising[0][2] - tokenising[0][1] - reading[-1][2],
            "after_prep_s": first_step - prep_end if first_step is not None else None}


def unsupported(rc: int, err: str) -> str | None:
    """What this deltatune refuses that the benchmark asks for: a data file type, a config key."""
    if rc != 2:
        return None
    line = error_line(err)
    if "unknown key" in line and "dataset_num_proc" in line:
        return "dataset_num_proc"
    if "unsupported file type" in line or "parquet" in line.lower():
        return "format"
    return None


# --- the runs -------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work, self.count = args, work, 0
        self.env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "DELTATUNE_PROGRESS": "1"}
        self.model_cache: Path | None = None  # the reference run's cache: its converted model is shared

    def folder(self, prefix: str) -> Path:
        self.count += 1
        path = self.work / f"{self.count:02d}-{prefix}"
        path.mkdir()
        return path

    def cold_cache(self) -> Path:
        """An empty DELTATUNE_CACHE but for the converted model, linked in from the reference run's."""
        cache = self.folder("cache")
        if self.model_cache is not None and (self.model_cache / "gguf").is_dir():
            (cache / "gguf").symlink_to(self.model_cache / "gguf", target_is_directory=True)
        return cache

    def cache_env(self, cache: Path) -> dict:
        # datasets' own cache too (parquet is converted to Arrow there): a cold run must not find what the
        # lint or an earlier run left in ~/.cache/huggingface, and 1M rows do not land there.
        return {**self.env, "DELTATUNE_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "hf-datasets")}

    def train(self, data: Path, cache: Path, overrides: list[str], label: str) -> dict:
        run = self.folder("train")
        config = {"model": MODEL, "method": "lora", "train_file": str(data), "validation_split": 0, "max_steps": 1,
                  "per_device_train_batch_size": 8, "max_seq_length": 256, "delta_report": False, "metric": "none",
                  "report_to": "none", "logging_steps": 1, "output_dir": str(run / "out"), "bf16": False,
                  "seed": self.args.seed}
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "deltatune", "train", str(run / "config.yaml"), *overrides]
        print(f"  {label} ...", flush=True)
        result = measure(cmd, run / "train", self.cache_env(cache), self.args.timeout,
                         metrics=run / "out" / "metrics.jsonl")
        result.update(label=label, cache=str(cache), overrides=overrides)
        say(result)
        return result

    def lint(self, data: Path, cache: Path, label: str = "lint") -> dict:
        run = self.folder("lint")
        cmd = [sys.executable, "-m", "deltatune", "lint", str(data), "--max-seq-length", "256"]
        print(f"  {label} ...", flush=True)
        result = measure(cmd, run / "lint", self.cache_env(cache), self.args.timeout)
        result.update(label=label, cache=str(cache))
        say(result)
        return result


def status(r: dict) -> str:
    if r["timed_out"]:
        return f"timeout ({r['wall_s']:.0f} s)"
    if r["unsupported"] == "format":
        return "not supported by this deltatune"
    return "ok" if r["rc"] == 0 else f"exit {r['rc']}"


def say(r: dict) -> None:
    parts = [status(r), f"{r['wall_s']:.1f} s", f"peak {whole_peak(r):.2f} GB"]
    if r.get("prep_s") is not None:
        parts.append(f"preparation {r['prep_s']:.1f} s")
    if r.get("first_step_s") is not None:
        parts.append(f"step 1 at {r['first_step_s']:.1f} s")
    if max(r["busy_cores_before"], r["busy_cores_during"]) > BUSY:
        parts.append(f"other work kept {r['busy_cores_before']:.1f} cores busy just before it, "
                     f"{r['busy_cores_during']:.1f} during it")
    print("    " + ", ".join(parts) + (f"; {r['error']}" if r["error"] else "") + f" (log {r['log']}.err)",
          flush=True)


def above_model(r: dict, reference: dict | None) -> float | None:
    """The data's own memory: the preparation peak over the reference run's (see the docstring)."""
    if reference is None or r.get("prep_peak_gb") is None or reference.get("prep_peak_gb") is None:
        return None
    return r["prep_peak_gb"] - reference["prep_peak_gb"]


def whole_peak(r: dict) -> float:
    return max(r["peak_gb"], r["tree_peak_gb"])


# --- the report -----------------------------------------------------------------------------------

def environment() -> dict:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    flags: set[str] = set()
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= {f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))}
            elif line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        ram = float("nan")
    return {"python": platform.python_version(), **{p: version(p) for p in
            ("deltatune", "torch", "transformers", "datasets", "pyarrow")},
            "cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram, 1), "cpu_flags": sorted(flags)}


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], reference: dict | None) -> None:
    print("| run | result | other load, cores (before / during) | wall s | start-up s | preparation s (read + "
          "tokenise) | load s | preparation end → step 1 s (step 1 alone) | start → step 1 s | peak RSS preparation "
          "GB | peak RSS training GB | peak RSS whole GB | data above model GB (whole-run peak's difference) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        train = r["label"] != "lint"
        above = fmt(above_model(r, reference), 2) if train and r["rc"] == 0 else ""
        if above and reference:
            above += f" ({whole_peak(r) - whole_peak(reference):+.2f})"
        after = fmt(r.get("after_prep_s")) + (f" ({fmt(r['fit_step_one_s'])})" if r.get("fit_step_one_s") else "")
        cells = [r["label"], status(r), f"{r['busy_cores_before']:.1f} / {r['busy_cores_during']:.1f}",
                 f"{r['wall_s']:.1f}", fmt(r.get("startup_s")), fmt(r.get("prep_s")), fmt(r.get("load_s")), after,
                 fmt(r.get("first_step_s")), fmt(r.get("prep_peak_gb"), 2), fmt(r.get("train_peak_gb"), 2),
                 f"{whole_peak(r):.2f}", above]
        print("| " + " | ".join(cells) + " |")


def contended(*runs: dict | None) -> str:
    busy = max((max(r["busy_cores_before"], r["busy_cores_during"]) for r in runs if r), default=0.0)
    return f"; other work kept {busy:.1f} cores busy, so the time is not clean" if busy > BUSY else ""


def verdict(value: float | None, limit: float, unit: str) -> str:
    if value is None:
        return "not measured"
    if value <= limit:
        return f"holds ({value:.2f}{unit} ≤ {limit:g}{unit})"
    return f"misses by {value - limit:.2f}{unit} ({value:.2f}{unit}, {value / limit:.2f}× the target)"


def ok_runs(rows: list[dict]) -> dict[str, dict]:
    return {r["label"]: r for r in rows if r["rc"] == 0 and not r["timed_out"]}


def targets(results: dict, reference: dict[str, dict], nproc: int | None) -> list[dict]:
    """The absolute targets at the largest size run (they are stated for 1M), per format."""
    out = []
    for fmt_name in sorted({f for _, f in results}):
        sizes = sorted(n for n, f in results if f == fmt_name and ok_runs(results[n, f]))
        if not sizes:
            continue
        n = sizes[-1]
        runs = ok_runs(results[n, fmt_name])
        cold = runs.get(COLD_ALL.format(nproc)) if nproc else None
        cold_label = "all processes" if cold else "1 process (no multi-process run)"
        cold = cold or runs.get(COLD_ONE)
        warm = runs.get(WARM)
        trains = [r for label, r in runs.items() if label != "lint"]
        above = max((a for r in trains if (a := above_model(r, reference[fmt_name])) is not None), default=None)
        scope = f"{n:,} conversations, {fmt_name}"
        if n != TARGET_SIZE:
            scope += f" (the target is for {TARGET_SIZE:,})"
        for name, value, limit, unit, run in (
                (f"preparation, cold cache, {cold_label} ≤ 5 min", cold and cold["prep_s"], TARGETS["prep_seconds"],
                 " s", cold),
                ("warm cache: start → first optimizer step ≤ 15 s", warm and warm["first_step_s"],
                 TARGETS["warm_first_step_seconds"], " s", warm),
                ("peak RSS for data ≤ 1.5 GB above the model's", above, TARGETS["data_rss_gb"], " GB", None)):
            out.append({"target": name, "size": n, "format": fmt_name, "value": value, "limit": limit,
                        "holds": value is not None and value <= limit, "text": f"{name} [{scope}]: "
                        f"{verdict(value, limit, unit)}{contended(run)}"})
    return out


def scaling(results: dict) -> list[dict]:
    """Ratios between consecutive sizes: cost may grow at most 1.1× as fast as the data."""
    out = []
    for fmt_name in sorted({f for _, f in results}):
        sizes = sorted(n for n, f in results if f == fmt_name)
        for small, large in zip(sizes, sizes[1:]):
            a, b = ok_runs(results[small, fmt_name]), ok_runs(results[large, fmt_name])
            size_ratio = large / small
            for label in [label for label in a if label in b]:
                for key, what in (("prep_s", "preparation"), ("first_step_s", "start → step 1"),
                                  ("wall_s", "wall")):
                    if label == "lint" and key != "wall_s" or label != "lint" and key == "wall_s":
                        continue
                    x, y = a[label].get(key), b[label].get(key)
                    if not x or y is None:
                        continue
                    ratio = y / x
                    limit = TARGETS["growth"] * size_ratio
                    note = " (the smaller is under 1 s: too short to judge)" if x < 1 else ""
                    note += contended(a[label], b[label])
                    text = (f"{fmt_name} {small:,} → {large:,} ({size_ratio:g}× the data), {label}, {what}: "
                            f"{x:.1f} → {y:.1f} s, {ratio:.2f}× "
                            f"({'holds' if ratio <= limit else f'misses: over {limit:.2f}×'}){note}")
                    out.append({"format": fmt_name, "from": small, "to": large, "run": label, "measure": what,
                                "ratio": ratio, "limit": limit, "holds": ratio <= limit, "text": text})
    return out


COLD_ONE, COLD_ALL, WARM = "train, cold cache, 1 process", "train, cold cache, {} processes", "train, warm cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="conversations per file, comma-separated")
    parser.add_argument("--formats", default="jsonl,parquet", help="comma-separated: jsonl, parquet")
    parser.add_argument("--out", help="folder for the data files (default: a temp folder); existing ones are reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1,
                        help="dataset_num_proc of the all-processes run (default: the cores)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each child may run")
    parser.add_argument("--generate-only", action="store_true", help="write the data files and stop")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (caches, logs, outputs)")
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    if set(formats) - {"jsonl", "parquet"}:
        parser.error(f"--formats: jsonl and/or parquet, not {','.join(set(formats) - {'jsonl', 'parquet'})}")
    data_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-scale-data-"))
    data_dir.mkdir(parents=True, exist_ok=True)

    env = environment()
    print(f"python {env['python']}, deltatune {env['deltatune']}, torch {env['torch']}, transformers "
          f"{env['transformers']}, datasets {env['datasets']}, pyarrow {env['pyarrow']}; {env['cpu']}, "
          f"{env['cores']} cores, {env['ram_gb']} GB RAM, CPU flags: {' '.join(env['cpu_flags']) or 'no avx/amx'}",
          flush=True)
    files: dict[int, dict[str, Path]] = {}
    written: dict[int, float | None] = {}
    for n in [REFERENCE_SIZE, *sizes]:
        files[n], written[n] = write_data(data_dir, n, args.seed, formats)
        sizes_mb = ", ".join(f"{f} {p.stat().st_size / 1e6:.1f} MB" for f, p in files[n].items())
        how = "already there" if written[n] is None else f"written in {written[n]:.1f} s"
        print(f"{n:,} conversations: {sizes_mb} ({how}) in {data_dir}", flush=True)
    if args.generate_only:
        return

    work = Path(tempfile.mkdtemp(prefix="bench-scale-runs-"))
    bench = Bench(args, work)
    print(f"\nreference: {REFERENCE_SIZE} conversations (runs in {work})", flush=True)
    if (busy := busy_cores()) > BUSY:
        print(f"  note: {busy:.1f} cores busy before any run; something else is using the CPUs, and the times "
              "below include its share", flush=True)
    # The embedded model's one-time GGUF → safetensors conversion, by a lint (it loads the tokenizer, so it
    # converts): kept out of every later run, whose caches link the converted model in.
    bench.model_cache = bench.folder("cache")
    conversion = bench.lint(files[REFERENCE_SIZE][formats[0]], bench.model_cache, "model conversion (lint)")
    if conversion["rc"] != 0 or conversion["timed_out"]:
        raise SystemExit(f"converting the model failed ({status(conversion)}; log {conversion['log']}.err)")
    # The reference runs: the model's own footprint and start-up. The first also asks whether this
    # deltatune has dataset_num_proc (an unknown override is refused before anything loads).
    first = formats[0]
    ref = bench.train(files[REFERENCE_SIZE][first], bench.cold_cache(), ["dataset_num_proc=1"],
                      f"reference {first}, dataset_num_proc=1")
    num_proc_note = None
    if ref["unsupported"] == "dataset_num_proc":
        num_proc_note = f"skipped the multi-process runs: this deltatune has no dataset_num_proc key ({ref['error']})"
        print(f"  {num_proc_note}", flush=True)
        ref = bench.train(files[REFERENCE_SIZE][first], bench.cold_cache(), [], f"reference {first}")
    proc_override = [] if num_proc_note else ["dataset_num_proc=1"]
    reference = {first: ref}
    for fmt_name in formats[1:]:
        reference[fmt_name] = bench.train(files[REFERENCE_SIZE][fmt_name], bench.cold_cache(), proc_override,
                                          f"reference {fmt_name}")
    unsupported_formats = {}
    for fmt_name, r in list(reference.items()):
        if r["unsupported"] == "format":
            unsupported_formats[fmt_name] = r["error"]
            print(f"  {fmt_name}: not supported by this deltatune ({r['error']}); its sizes are skipped", flush=True)
        elif r["rc"] != 0 or r["timed_out"]:
            raise SystemExit(f"the reference run failed ({status(r)}; log {r['log']}.err): {r['error']}")
    nproc = args.num_proc if not num_proc_note and args.num_proc > 1 else None
    if not num_proc_note and nproc is None:
        num_proc_note = "skipped the multi-process runs: --num-proc is 1"

    results: dict[tuple[int, str], list[dict]] = {}
    for n in sizes:
        for fmt_name in formats:
            if fmt_name in unsupported_formats:
                continue
            print(f"\n{n:,} conversations, {fmt_name}", flush=True)
            path = files[n][fmt_name]
            rows = [bench.lint(path, bench.cold_cache())]
            cold = bench.cold_cache()
            rows.append(bench.train(path, cold, proc_override, COLD_ONE))
            warm_overrides = proc_override
            if nproc:
                cold = bench.cold_cache()
                warm_overrides = [f"dataset_num_proc={nproc}"]
                rows.append(bench.train(path, cold, warm_overrides, COLD_ALL.format(nproc)))
            if rows[-1]["rc"] == 0:  # the warm run reads what the last cold run cached, with its settings
                rows.append(bench.train(path, cold, warm_overrides, WARM))
            results[n, fmt_name] = rows
            if not args.keep:  # a 1M run's cache and output are large; the logs stay
                for r in rows:
                    if r.get("cache"):
                        shutil.rmtree(r["cache"], ignore_errors=True)
                    shutil.rmtree(Path(r["log"]).parent / "out", ignore_errors=True)

    print("\n## Results\n")
    print(f"Model conversion (GGUF → safetensors, once, by a lint of {REFERENCE_SIZE} conversations): "
          f"{conversion['wall_s']:.1f} s, not in any figure below.\n")
    print(f"Reference ({REFERENCE_SIZE} conversations: the model's own footprint and start-up):\n")
    table(list(reference.values()), None)
    for (n, fmt_name), rows in results.items():
        how = "already there" if written[n] is None else f"generated in {written[n]:.1f} s"
        print(f"\n### {n:,} conversations, {fmt_name} ({files[n][fmt_name].stat().st_size / 1e6:.1f} MB, {how})\n")
        table(rows, reference.get(fmt_name))
    for fmt_name, why in unsupported_formats.items():
        print(f"\n{fmt_name}: not supported by this deltatune ({why})")
    if num_proc_note:
        print(f"\n{num_proc_note}")
    goals = targets(results, reference, nproc)
    growth = scaling(results)
    print("\n## Targets\n")
    for line in [g["text"] for g in goals] + [g["text"] for g in growth]:
        print(f"- {line}")
    print("\nStart-up: child start to the reading stage (imports, config, preflight). Preparation: the reading and "
          "tokenising stages of deltatune's stderr (0.1 s resolution); load: the gap between them (model, "
          "tokenizer, split). Preparation end → step 1: LoRA, output folder, fit set-up and the first step (in "
          "brackets: fit's own elapsed_seconds at step 1). Start → step 1: child start to the step-1 record of "
          f"metrics.jsonl (polled every {POLL} s). Peaks: preparation = VmHWM when tokenising ends (worker "
          "processes: their sampled sum), training = the peak after it, whole = rusage (os.wait4); data above "
          "model = the preparation peak minus the reference run's of the same format (in brackets the whole-run "
          "peaks' difference, set mostly by the first batch's padded length). Other load: cores busy with other work "
          "in the second before the run (no child of this benchmark running) and during it (the machine's busy CPU "
          f"time less the child's own); above {BUSY}, another job shared the CPUs and the times are not clean.")
    if not args.keep:  # the converted model and the reference caches too; a temp data folder as well
        for r in [conversion, *reference.values()]:
            shutil.rmtree(r["cache"], ignore_errors=True)
            shutil.rmtree(Path(r["log"]).parent / "out", ignore_errors=True)
        if not args.out:
            shutil.rmtree(data_dir, ignore_errors=True)
        print(f"(logs in {work}; caches, outputs and temp data removed, --keep keeps them)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "environment": env, "data_dir": str(data_dir), "work": str(work),
             "generated_s": {str(n): s for n, s in written.items()}, "model_conversion": conversion,
             "reference": reference,
             "unsupported_formats": unsupported_formats, "num_proc": nproc, "num_proc_note": num_proc_note,
             "results": [{"size": n, "format": f, "runs": rows} for (n, f), rows in results.items()],
             "targets": goals, "scaling": growth}, indent=1))


if __name__ == "__main__":
    main()
