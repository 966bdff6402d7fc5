"""Run configuration: one flat, typed, validated record of what a run does.

YAML keys are the field names below; where Hugging Face `TrainingArguments` has a name for
a setting we use that name, so configs read familiar. Unknown keys are errors with a
did-you-mean, and values are checked before anything touches the disk. The loaded config is
never changed afterwards: values derived from it (warm-up steps, the bf16 decision) are
computed where they are used and logged, not written back.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deltatune.errors import UserError

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "classification"]


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    # --- what to train -------------------------------------------------------------------
    model: str = "smollm2-135m-instruct"
    """Base model: an embedded name (`smollm2-135m-instruct`, `minilm-l6`), a local Hugging Face folder, a `.gguf` file, or a hub id."""
    method: Literal["full", "lora", "dora", "qlora", "head_only", "freeze"] = "full"
    """Which parameters train: `full` every weight; `lora`/`dora` low-rank adapters (peft); `qlora` LoRA on a 4-bit base (CUDA + bitsandbytes); `head_only` the output or classification head; `freeze` all but `freeze_layers`/`trainable_modules`."""
    task: Literal["sft", "text", "classification"] = "sft"
    """Objective: `sft` trains a causal LM on the assistant turns of conversations; `text` continues pre-training on raw text packed into blocks; `classification` trains a sequence classifier on text/label records."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank (lora, dora, qlora)."""
    lora_alpha: float | None = Field(None, gt=0.0)
    """LoRA scaling numerator; the update is scaled by lora_alpha / lora_r. Default: 2 * lora_r."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | None = None
    """Module names (peft suffix match) that get adapters; default: every linear layer inside the transformer blocks."""
    freeze_layers: int | None = Field(None, ge=0)
    """method freeze: the bottom N transformer blocks (and the embeddings) stay frozen."""
    trainable_modules: list[str] | None = None
    """method freeze: regexes (re.search on parameter names); only matching parameters train. Embeddings train only if named."""

    # --- data ----------------------------------------------------------------------------
    train_file: str | None = None
    """Training data: JSONL, JSON (array) or CSV."""
    validation_file: str | None = None
    """Held-out data for validation loss; when absent, `validation_split` of the training file is held out."""
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the training file held out for validation (seeded) when there is no `validation_file`."""
    test_file: str | None = None
    """Held-out prompts with reference answers, scored with `metric` before and after training."""
    format: Format = "auto"
    """Record format; `auto` detects it from the first record's fields."""
    max_seq_length: int = Field(1024, ge=8)
    """Longer examples are truncated on the right; examples left with no trained token are dropped."""
    train_on_inputs: bool = False
    """Train on every token (prompts too) instead of the assistant turns only."""

    # --- optimisation (Hugging Face TrainingArguments names) ----------------------------
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay (not applied to biases and norms)."""
    num_train_epochs: float = Field(3.0, gt=0.0)
    """Passes over the training data; ignored when `max_steps` > 0."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means use `num_train_epochs`."""
    per_device_train_batch_size: int = Field(8, ge=1)
    """Examples per forward/backward pass."""
    per_device_eval_batch_size: int = Field(8, ge=1)
    """Examples per evaluation pass."""
    max_tokens_per_batch: int | None = Field(16384, ge=1)
    """Cap on padded tokens (examples x longest) in an evaluation batch or an unpacked training micro-batch: long examples go in smaller batches, so memory is bounded by tokens. null = examples only."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is normalised by the label tokens of the whole step."""
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Share of the steps with a linear warm-up; `warmup_steps` wins when > 0."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up."""
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    seed: int = 42
    """Seeds the data split, shuffling and initialisation."""
    bf16: Literal["auto"] | bool = "auto"
    """bfloat16 autocast with float32 master weights; `auto` uses it where the hardware runs it natively."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a lower validation loss, and keep the best weights."""

    # --- several processes (torchrun / `deltatune train --nproc N`) ---------------------------
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """How processes share the work under torchrun: `ddp` keeps a full model per process, `fsdp` shards weights, gradients and optimizer state (FSDP2, per transformer block). Ignored on one process."""
    fsdp_cpu_offload: bool = False
    """With `parallelism: fsdp`, keep the shards and optimizer state in CPU memory (slower; for models that do not fit the GPUs)."""
    ddp_timeout: int = Field(1800, ge=1)
    """Seconds a process waits for the others in a collective before the job fails (a crashed or hung rank ends the run instead of hanging it)."""
    # --- speed and memory ------------------------------------------------------------------
    packing: bool = True
    """Pack each optimizer step's examples into rows (block-diagonal mask, per-example positions): no padding, same steps."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward: less memory, about a third more compute."""
    torch_compile: bool = False
    """Compile the decoder with torch.compile (dynamic shapes); pays off only on long runs."""
    optimizer_in_backward: bool = False
    """Run AdamW on each parameter as soon as its gradient is complete and free that gradient: the gradients of the whole model never exist at once (saves 4 bytes a trainable parameter). Same update as the ordinary step; needs max_grad_norm: 0 (no global norm exists before the update) and one process."""
    optimizer_state_dtype: Literal["float32", "bfloat16"] = "float32"
    """Store AdamW's two moments in this dtype. bfloat16 halves the optimizer's memory (4 bytes a trainable parameter instead of 8; for full fine-tuning that is as much as the weights themselves). Each step still computes in float32 with PyTorch's fused AdamW; the moments are written back with stochastic rounding, exact in expectation (round-to-nearest would stall the second moment). Clipping works as usual. Not with parallelism: fsdp."""
    cpu_heap_trim: bool = False
    """Linux with glibc: while training, hand the memory PyTorch freed back to the OS before each transformer block's forward and backward, whenever the process grew by 32 MB since the last time. glibc otherwise keeps freed activations inside its heap (~0.4 GB for SmolLM2-135M with LoRA). Costs time: returned pages are faulted in again when reused (~30% a step there; benchmarks/RESULTS.md). Numbers are unchanged."""
    frozen_weights_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """method lora/dora: keep the frozen base weights of the blocks' linear layers in this dtype while training (half the memory of float32); only their storage changes, every matmul still computes in the activation dtype. Costs rounding (float16 keeps 11 significant bits, bfloat16 8) during training only: the float32 weights are restored, bit for bit, before the tuned model is evaluated and saved."""

    # --- logging, evaluation, checkpoints -----------------------------------------------
    output_dir: str = "runs/deltatune"
    """Where the run writes `final/`, `metrics.jsonl`, `summary.md` and checkpoints."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty `output_dir`."""
    logging_steps: int = Field(10, ge=1)
    """Log training loss every this many optimizer steps."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate every this many steps; by default at the end of each epoch."""
    save_steps: int | None = Field(None, ge=1)
    """Write a checkpoint every this many steps; by default none before `final/`."""
    save_total_limit: int | None = Field(None, ge=1)
    """Keep at most this many checkpoints, deleting the oldest."""
    resume_from_checkpoint: str | None = None
    """Continue a run: `latest` (the newest complete checkpoint in `output_dir`; starts at step 0 if there is none yet) or a checkpoint folder. `deltatune train CONFIG --resume` sets `latest`."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop when this many optimizer steps in a row have a non-finite loss or gradient norm (each is skipped, not applied)."""
    metric: Literal["exact_match", "contains", "regex", "json_schema", "none"] = "exact_match"
    """Task metric on `test_file`, scored on greedy generations: `exact_match` (equals the reference), `contains` (holds the reference), `regex` (fully matches `metric_pattern`), `json_schema` (is JSON valid under `metric_schema`)."""
    metric_pattern: str | None = None
    """With `metric: regex`: the Python regular expression an output must fully match."""
    metric_schema: str | None = None
    """With `metric: json_schema`: path of the JSON Schema file an output must satisfy."""
    max_new_tokens: int = Field(64, ge=1)
    """Generation length limit for the task metric."""

    # --- delta report (what fine-tuning changed) ------------------------------------------
    delta_report: bool = True
    """End the run with report.md/report.html/delta.json comparing base and tuned (task gain, forgetting, weight change)."""
    general_text_file: str | None = None
    """UTF-8 text file (passages separated by blank lines) for forgetting; default: CPython's pydoc topics."""
    probe_files: list[str] = Field(default_factory=list)
    """Extra fact-recall probe sets (JSONL/JSON/CSV with `prompt` and `answer`), scored with the built-in set."""
    side_by_side_prompts: int = Field(8, ge=0)
    """Held-out test prompts shown with base and tuned outputs side by side (classification: texts with the true label and both predictions)."""
    kl_samples: int = Field(8, ge=0)
    """Continuations sampled from the base model for the Monte-Carlo KL(base‖tuned); 0 skips it."""

    # --- safety --------------------------------------------------------------------------
    allow_pickle: bool = False
    """Allow loading pickle checkpoints (.bin/.pt), which can run arbitrary code."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""

    @model_validator(mode="before")
    @classmethod
    def _model_default_for_task(cls, raw):
        # The base model's default depends on the objective: an encoder for classification.
        if isinstance(raw, dict) and "model" not in raw and raw.get("task") == "classification":
            raw = {**raw, "model": "minilm-l6"}
        return raw

    @model_validator(mode="after")
    def _check_sources(self) -> "RunConfig":
        if self.train_file is None:
            raise ValueError("train_file is required (path to a JSONL, JSON or CSV file)")
        if (self.metric == "regex") != (self.metric_pattern is not None):
            raise ValueError("metric_pattern goes with metric: regex, and metric: regex needs metric_pattern")
        if (self.metric == "json_schema") != (self.metric_schema is not None):
            raise ValueError("metric_schema goes with metric: json_schema, and metric: json_schema needs metric_schema")
        return self

    @model_validator(mode="after")
    def _check_method_keys(self) -> "RunConfig":
        # Compared with the defaults, not "was it set": a dumped config.yaml lists every key.
        lora_keys = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                     if getattr(self, k) != type(self).model_fields[k].default]
        if lora_keys and self.method not in ("lora", "dora", "qlora"):
            raise ValueError(f"{', '.join(lora_keys)} only apply to method lora, dora or qlora "
                             f"(method is '{self.method}')")
        freeze_keys = [k for k in ("freeze_layers", "trainable_modules") if getattr(self, k) is not None]
        if freeze_keys and self.method != "freeze":
            raise ValueError(f"{', '.join(freeze_keys)} only apply to method freeze (method is '{self.method}')")
        if self.method == "freeze" and not freeze_keys:
            raise ValueError("method freeze needs freeze_layers: N or trainable_modules: [regex, ...]")
        for pattern in self.trainable_modules or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"trainable_modules: '{pattern}' is not a valid regex ({err})") from None
        return self

    @model_validator(mode="after")
    def _check_optimizer_keys(self) -> "RunConfig":
        if self.optimizer_in_backward and self.max_grad_norm > 0:
            raise ValueError("optimizer_in_backward updates each weight as soon as its gradient is ready, so the "
                             "global gradient norm cannot be clipped: set max_grad_norm: 0 with it")
        if self.optimizer_state_dtype != "float32" and self.parallelism == "fsdp":
            raise ValueError(f"optimizer_state_dtype: {self.optimizer_state_dtype} does not work with parallelism: fsdp, "
                             "whose sharded parameters it cannot chunk (use parallelism: ddp or optimizer_state_dtype: float32)")
        return self

    @model_validator(mode="after")
    def _check_cpu_heap_trim(self) -> "RunConfig":
        from deltatune.host_memory import heap_trim_available

        if self.cpu_heap_trim and not heap_trim_available():
            raise ValueError("cpu_heap_trim: true needs glibc's malloc_trim (Linux with glibc), which this system "
                             "lacks (set cpu_heap_trim: false)")
        return self

    @model_validator(mode="after")
    def _check_frozen_weights_dtype(self) -> "RunConfig":
        if self.frozen_weights_dtype != "float32" and self.method not in ("lora", "dora"):
            raise ValueError(f"frozen_weights_dtype: {self.frozen_weights_dtype} applies to method lora or dora only "
                             f"(method is '{self.method}'; set frozen_weights_dtype: float32)")
        if self.frozen_weights_dtype != "float32" and self.method == "dora" and self.lora_dropout > 0:
            # peft's DoRA then recomputes the base output from a float32 copy of each weight and
            # keeps that copy for backward: more memory, not less.
            raise ValueError(f"frozen_weights_dtype: {self.frozen_weights_dtype} with method dora needs lora_dropout: 0 "
                             "(set lora_dropout: 0 or frozen_weights_dtype: float32)")
        if self.frozen_weights_dtype != "float32" and self.parallelism == "fsdp":
            raise ValueError(f"frozen_weights_dtype: {self.frozen_weights_dtype} does not work with parallelism: fsdp, "
                             "which shards every weight in one dtype (use parallelism: ddp or frozen_weights_dtype: float32)")
        return self


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "literal_error":
        msg = f"got {first['input']!r}; {msg[0].lower()}{msg[1:]}"
    elif "input" in first and first["type"] not in ("missing", "value_error"):
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


def _rebase_paths(raw: dict, base_dir: Path) -> dict:
    """Make relative file paths in a config file relative to that file, not to the cwd."""
    raw = dict(raw)
    for key in ("train_file", "validation_file", "test_file", "output_dir", "model", "resume_from_checkpoint",
                "metric_schema"):
        value = raw.get(key)
        if key == "resume_from_checkpoint" and value == "latest":
            continue
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = base_dir / value
            # `model` may be a name or hub id: only rebase it when it names a local path.
            if key != "model" or candidate.exists():
                raw[key] = str(candidate)
    if isinstance(raw.get("general_text_file"), str) and not Path(raw["general_text_file"]).is_absolute():
        raw["general_text_file"] = str(base_dir / raw["general_text_file"])
    if isinstance(raw.get("probe_files"), list):
        raw["probe_files"] = [str(base_dir / f) if isinstance(f, str) and not Path(f).is_absolute() else f
                              for f in raw["probe_files"]]
    return raw


def build_config(raw: dict, origin: str) -> RunConfig:
    """Validate a mapping into a RunConfig, with errors that name the key."""
    fields = RunConfig.model_fields
    for key in raw:
        if key not in fields:
            raise UserError(f"{origin}: unknown key '{key}'{_did_you_mean(key, fields)}")
    try:
        return RunConfig(**raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, origin)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config file (or none) and apply `key=value` overrides on top of it."""
    raw: dict = {}
    origin = "command line"
    if path is not None:
        path = Path(path)
        origin = str(path)
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
        for key in raw:
            if key not in RunConfig.model_fields:
                raise UserError(f"{path}: unknown key '{key}'{_did_you_mean(key, RunConfig.model_fields)}")
        raw = _rebase_paths(raw, path.parent)
    cli = parse_overrides(list(overrides))
    for key in cli:
        if key not in RunConfig.model_fields:
            raise UserError(f"override '{key}': unknown key{_did_you_mean(key, RunConfig.model_fields)}")
    return build_config({**raw, **cli}, origin)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config, every key, as YAML (written next to the run's outputs)."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
