"""The text side of configuration: `key=value` overrides, paths relative to a config file, and error lines for
keys and values (config.py holds the typed groups these feed)."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from deltatune.errors import UserError

REMOVED_KEYS = {
    "cpu_heap_trim": "it was removed (a glibc heap knob that slowed training by about 30%); delete the line",
}
SYNONYMS = {"dtype": "torch_dtype"}  # another tool's (here transformers 5's) name for one of our keys
FOLDED = {"frozen_weights_dtype": "torch_dtype"}  # an old key now part of another (its default, float32, is dropped)


def did_you_mean(key: str, choices) -> str:
    """A " (did you mean 'x'?)" hint for a mistyped key, or nothing."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_validation_error(err: ValidationError, origin: str) -> str:
    """The first validation error as one line naming the key."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if "input" in first and first["type"] not in ("missing", "value_error"):  # literal_error among them
        msg = f"got {first['input']!r}; {msg[0].lower()}{msg[1:]}"
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{origin}: key '{key}': {msg}"


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` command-line overrides; values are parsed as YAML scalars (1e-4, true, null)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override '{pair}' is not key=value (e.g. learning_rate=1e-4)")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else None
    return out


def rebase_paths(raw: dict, base_dir: Path) -> dict:
    """Make relative file paths in a config file relative to that file, not to the cwd."""
    def rebased(value, only_if_there: bool = False):
        # Absolute paths and hub ids stay; names (a model, a built-in template) only when they name a local path.
        if not isinstance(value, str) or not value or Path(value).is_absolute() or value.startswith("hf://"):
            return value
        candidate = base_dir / value
        return str(candidate) if not only_if_there or candidate.exists() else value

    raw = dict(raw)
    for key in ("train_file", "validation_file", "test_file", "output_dir", "model", "resume_from_checkpoint",
                "metric_schema", "benchmark_tasks_dir", "general_text_file", "chat_template"):
        if key in raw and not (key == "resume_from_checkpoint" and raw[key] == "latest"):
            raw[key] = rebased(raw[key], only_if_there=key in ("model", "chat_template"))
    if isinstance(raw.get("datasets"), list):  # each source's path, like train_file's
        raw["datasets"] = [{**entry, "path": rebased(entry.get("path"))} if isinstance(entry, dict) and "path" in entry
                           else entry for entry in raw["datasets"]]
    if isinstance(raw.get("probe_files"), list):
        raw["probe_files"] = [rebased(f) for f in raw["probe_files"]]
    return raw


def read_mapping(path: Path) -> dict:
    """A YAML config file's mapping, or the one-line error that says what is wrong with the file."""
    if not path.is_file():
        raise UserError(f"{path}: config file not found (pass the path to a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (save the config as UTF-8)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a mapping of key: value lines")
    return raw


def check_keys(keys, origin: str | None, known: dict) -> None:
    """Every key must be one of ours (`known`): a removed one says what became of it, a typo gets a
    did-you-mean. `origin` None: the keys are command-line overrides."""
    for key in keys:
        where = f"{origin}: key '{key}'" if origin else f"override '{key}'"
        if key in REMOVED_KEYS:
            raise UserError(f"{where}: {REMOVED_KEYS[key]}")
        if key not in known and key not in SYNONYMS and key not in FOLDED:
            where = f"{origin}: unknown key '{key}'" if origin else f"override '{key}': unknown key"
            raise UserError(f"{where}{did_you_mean(key, known)}")


def with_our_names(raw: dict, origin: str) -> dict:
    """The keys another tool names differently (SYNONYMS) under our names; both names at once is an error."""
    for other, ours in SYNONYMS.items():
        if other in raw and ours in raw:
            raise UserError(f"{origin}: keys '{other}' and '{ours}' name the same setting; keep one")
    return fold_old_keys({SYNONYMS.get(k, k): v for k, v in raw.items()}, origin)


def fold_old_keys(raw: dict, origin: str) -> dict:
    """`frozen_weights_dtype: X` (frozen adapter-run weights stored in X while training) is `torch_dtype: X` now,
    which keeps them in X for the whole run: read so, with a one-line note; float32 (its default) says nothing."""
    if "frozen_weights_dtype" not in raw:
        return raw
    raw = dict(raw)
    value = raw.pop("frozen_weights_dtype")
    if value in (None, "float32"):
        return raw
    where = f"{origin}: key 'frozen_weights_dtype'"
    if raw.get("method", "full") not in ("lora", "dora"):
        raise UserError(f"{where}: {value} applies to method lora or dora only (delete the line)")
    if raw.get("torch_dtype", "auto") not in ("auto", "float32", value):
        raise UserError(f"{where}: {value} is torch_dtype: {value} now, and torch_dtype is "
                        f"{raw['torch_dtype']}; keep torch_dtype only")
    print(f"{where}: read as torch_dtype: {value} (frozen weights now stay in {value} for the whole run, "
          "evaluation included); rename the key", file=sys.stderr, flush=True)
    return {**raw, "torch_dtype": value}
