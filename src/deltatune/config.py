"""Run configuration: typed groups of settings, read from one flat YAML file.

YAML keys are flat and, where Hugging Face `TrainingArguments` has a name for a setting, they
use that name, so configs read familiar. In code they live in groups (`ModelArgs`,
`TrainArgs`, ...), and each stage is handed the group it needs, not the whole config: `fit`
takes `TrainArgs` and `MemoryArgs`, the delta report `DeltaArgs`. `task` and `seed` are read
by every stage, so they sit at the top.

Unknown keys are errors with a did-you-mean, and values are checked before anything touches
the disk; validators check values only (what the machine can do is `pipeline.preflight`'s
job). The loaded config is never changed afterwards: values derived from it (warm-up steps,
the bf16 decision) are computed where they are used and logged, not written back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deltatune.config_text import (
    check_keys,
    format_validation_error,
    parse_overrides,
    read_mapping,
    rebase_paths,
    with_our_names,
)
from deltatune.errors import UserError

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "classification",
                 "preference"]
Task = Literal["sft", "text", "classification", "preference"]
GROUP = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, populate_by_name=True)
# The base model's default depends on the objective: an encoder for classification.
DEFAULT_MODEL = {"sft": "smollm2-135m-instruct", "text": "smollm2-135m-instruct", "classification": "minilm-l6",
                 "preference": "smollm2-135m-instruct"}
# Keys that once existed: naming one is an error that says what became of it.
LOSS_KEYS = {"simpo_gamma": ("simpo",), "orpo_lambda": ("orpo",), "beta": ("dpo", "ipo", "simpo")}  # key: its losses
class ModelArgs(BaseModel):
    """What to train: the base model, which of its parameters train, and what may run when it loads."""

    model_config = GROUP

    name: str = Field("smollm2-135m-instruct", alias="model")
    """Base model: an embedded name (`smollm2-135m-instruct`, `minilm-l6`), a local folder, a `.gguf` file, a hub id."""
    method: Literal["full", "lora", "dora", "qlora", "head_only", "freeze"] = "full"
    """Which parameters train: `full` every weight; `lora`/`dora` adapters (peft); `qlora` LoRA on a 4-bit base (CUDA,
    bitsandbytes); `head_only` the output/classifier head; `freeze` all but `freeze_layers`/`trainable_modules`."""
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
    """method freeze: regexes (re.search on parameter names); only matching parameters train (embeddings if named)."""
    allow_pickle: bool = False
    """Allow loading pickle checkpoints (.bin/.pt), which can run arbitrary code."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""
    chat_template: str | None = None
    """Render conversations with this template instead of the model's own (saved with final/): a Jinja file, or one of
    `chatml`, `llama3`, `gemma`, `mistral`, `phi3`, `qwen3`."""
    add_special_tokens: bool = False
    """Add the special tokens `chat_template` uses that the vocabulary lacks, and train their embedding rows (full
    fine-tuning, or beside LoRA/DoRA adapters)."""
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights load, and frozen ones stay, in this dtype (`dtype` too); `auto`: the checkpoint's own (config.json, GGUF
    float32). Trainable weights are float32. config.yaml records what `auto` became."""
    chat_template_kwargs: dict[str, str | int | float | bool | None] | None = None
    """Template options (Qwen3's `enable_thinking: false`), made the template's defaults: the same in training,
    generation, and the template saved with final/."""

    @model_validator(mode="after")
    def _check_method_keys(self) -> "ModelArgs":
        # Compared with the defaults, not "was it set": a dumped config.yaml lists every key.
        lora = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                if getattr(self, k) != type(self).model_fields[k].default]
        if lora and self.method not in ("lora", "dora", "qlora"):
            raise ValueError(f"{', '.join(lora)} only apply to method lora, dora or qlora (method is '{self.method}')")
        freeze_keys = [k for k in ("freeze_layers", "trainable_modules") if getattr(self, k) is not None]
        if freeze_keys and self.method != "freeze":
            raise ValueError(f"{', '.join(freeze_keys)} only apply to method freeze (method is '{self.method}')")
        if self.method == "freeze" and not freeze_keys:
            raise ValueError("method freeze needs freeze_layers: N or trainable_modules: [regex, ...]")
        if self.add_special_tokens and self.method in ("head_only", "freeze"):
            raise ValueError(f"add_special_tokens: the new tokens' embeddings must train, and method {self.method} "
                             "keeps them frozen (use full, lora, dora or qlora)")
        for pattern in self.trainable_modules or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"trainable_modules: '{pattern}' is not a valid regex ({err})") from None
        return self


class DataSource(BaseModel):
    """One entry of `datasets:` (a training mix)."""

    model_config = GROUP

    path: str
    """A JSONL/JSON/CSV/parquet/Arrow file, a save_to_disk folder, or hf://owner/name."""
    format: Format = "auto"
    """Record format of this source; `auto` detects it."""
    columns: dict[str, str] | None = None
    """Format field -> this source's column, e.g. {instruction: question, output: answer}."""
    split: str | None = None
    """The split of a multi-split source (default train)."""
    config: str | None = None
    """The configuration of a hub dataset that has several."""
    weight: float = Field(1.0, gt=0)
    """Share of the training draws (weights are normalised over the sources)."""


class DataArgs(BaseModel):
    """Where the examples come from and how they are cut."""

    model_config = GROUP

    train_file: str | None = None
    """Training data: JSONL, JSON (array), CSV, parquet or Arrow file, a save_to_disk folder, or hf://owner/name."""
    datasets: list[DataSource] | None = None
    """Instead of train_file: several sources drawn by weight (seeded), each {path, format, columns, split, weight}."""
    columns: dict[str, str] | None = None
    """Format field -> column of train/validation/test files, e.g. {instruction: question, output: answer}."""
    dataset_num_proc: int | None = Field(None, ge=1)
    """Processes that tokenise the chat data (default: the cores; data under 20,000 records takes one)."""
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
    streaming: bool = False
    """Tokenise the training records as training reads them (seeded shuffle buffer), nothing cached: needs max_steps."""
    train_on_reasoning: bool = True
    """false: an assistant turn's reasoning (up to its `</think>`) is shown to the model but not trained."""
    reasoning_format: Literal["auto", "template", "think"] = "auto"
    """How `reasoning_content` is rendered: by the template (`template`), as a `<think>` block before the content
    (`think`), or `auto`: the template when it renders the field, a `<think>` block otherwise."""


class TrainArgs(BaseModel):
    """The optimisation: AdamW, its schedule, and when the loop logs, evaluates and saves (TrainingArguments names)."""

    model_config = GROUP

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
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a lower validation loss, and keep the best weights."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop when this many optimizer steps in a row have a non-finite loss or gradient norm (each one is skipped)."""
    logging_steps: int = Field(10, ge=1)
    """Log training loss every this many optimizer steps."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate every this many steps; by default at the end of each epoch."""
    save_steps: int | None = Field(None, ge=1)
    """Write a checkpoint every this many steps; by default none before `final/`."""


class MemoryArgs(BaseModel):
    """Speed and memory: the same updates, computed or stored more cheaply."""

    model_config = GROUP

    bf16: Literal["auto"] | bool = "auto"
    """bfloat16 autocast with float32 master weights; `auto` uses it where the hardware runs it natively."""
    packing: bool = True
    """Pack each step's examples into rows (per-example positions, which isolate them): no padding, same steps."""
    max_tokens_per_batch: int | None = Field(16384, ge=1)
    """Cap on padded tokens (examples x longest) in an evaluation batch or an unpacked training micro-batch: long
    examples go in smaller batches, so memory is bounded by tokens. null = examples only."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward: less memory, about a third more compute."""
    torch_compile: bool = False
    """Compile the decoder with torch.compile (dynamic shapes); pays off only on long runs."""
    optimizer_in_backward: bool = False
    """Run AdamW on each parameter as soon as its gradient is complete and free that gradient: the gradients of the
    whole model never exist at once (saves 4 bytes a trainable parameter). Same update as the ordinary step; needs
    max_grad_norm: 0 (no global norm exists before the update) and one process."""
    optimizer_state_dtype: Literal["float32", "bfloat16"] = "float32"
    """Store AdamW's two moments in this dtype: bfloat16 halves the optimizer's memory (4 bytes a trainable parameter,
    not 8). Each step computes in float32 (fused AdamW); the moments are written back with stochastic rounding, exact
    in expectation (round-to-nearest would stall the second moment). Not with parallelism: fsdp."""


class PreferenceArgs(BaseModel):
    """task preference: which objective turns chosen/rejected pairs into a loss, and its constants."""

    model_config = GROUP

    loss_type: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    """`dpo` (sigmoid of the reward margin against the reference), `ipo` (squared distance of that margin from 1/(2τ)),
    `simpo` (reference-free, length-normalised, with a margin), `orpo` (reference-free: SFT loss plus odds ratio)."""
    beta: float = Field(0.1, gt=0.0)
    """DPO's and SimPO's β (how sharply the margin is scored); IPO's τ (the margin aimed at is 1/(2τ))."""
    simpo_gamma: float = Field(0.5, ge=0.0)
    """loss_type simpo: the target reward margin γ."""
    orpo_lambda: float = Field(0.1, gt=0.0)
    """loss_type orpo: the weight λ of the odds-ratio term beside the SFT loss."""

    @model_validator(mode="after")
    def _check_loss_keys(self) -> "PreferenceArgs":
        for key, losses in LOSS_KEYS.items():
            if getattr(self, key) != type(self).model_fields[key].default and self.loss_type not in losses:
                raise ValueError(f"{key} applies to loss_type {' or '.join(losses)} (loss_type is '{self.loss_type}')")
        return self


class ParallelArgs(BaseModel):
    """Several processes (torchrun / `deltatune train --nproc N`)."""

    model_config = GROUP

    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """How processes share the work under torchrun: `ddp` keeps a full model per process, `fsdp` shards weights,
    gradients and optimizer state (FSDP2, per transformer block). Ignored on one process."""
    fsdp_cpu_offload: bool = False
    """With `parallelism: fsdp`, keep shards and optimizer state in CPU memory (slower; for models too big for GPUs)."""
    ddp_timeout: int = Field(1800, ge=1)
    """Seconds a process waits for the others in a collective before the job fails (a crashed or hung rank ends the run
    instead of hanging it)."""


class EvalArgs(BaseModel):
    """Evaluation of the base and the tuned model: validation loss and the task metric on `test_file`."""

    model_config = GROUP

    per_device_eval_batch_size: int = Field(8, ge=1)
    """Examples per evaluation pass."""
    max_eval_samples: int | None = Field(1000, ge=1)
    """At most this many validation and test records are evaluated (a seeded sample of a bigger split); null: all."""
    metric: Literal["exact_match", "contains", "regex", "json_schema", "none"] = "exact_match"
    """Task metric on `test_file`, scored on greedy generations: `exact_match` (equals the reference), `contains` (holds
    the reference), `regex` (fully matches `metric_pattern`), `json_schema` (is JSON valid under `metric_schema`)."""
    metric_pattern: str | None = None
    """With `metric: regex`: the Python regular expression an output must fully match."""
    metric_schema: str | None = None
    """With `metric: json_schema`: path of the JSON Schema file an output must satisfy."""
    max_new_tokens: int = Field(64, ge=1)
    """Generation length limit for the task metric."""

    @model_validator(mode="after")
    def _check_metric_keys(self) -> "EvalArgs":
        if (self.metric == "regex") != (self.metric_pattern is not None):
            raise ValueError("metric_pattern goes with metric: regex, and metric: regex needs metric_pattern")
        if (self.metric == "json_schema") != (self.metric_schema is not None):
            raise ValueError("metric_schema goes with metric: json_schema, and metric: json_schema needs metric_schema")
        return self


class OutputArgs(BaseModel):
    """Where the run writes, what it keeps, and where it resumes from."""

    model_config = GROUP

    output_dir: str = "runs/deltatune"
    """Where the run writes `final/`, `metrics.jsonl`, `summary.md` and checkpoints."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty `output_dir`."""
    save_total_limit: int | None = Field(None, ge=1)
    """Keep at most this many checkpoints, deleting the oldest."""
    resume_from_checkpoint: str | None = None
    """Continue a run: `latest` (the newest complete checkpoint in `output_dir`; starts at step 0 if there is none yet)
    or a checkpoint folder. `deltatune train CONFIG --resume` sets `latest`."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = ["tensorboard"]
    """Trackers that get the config, every logged scalar, the closing numbers and the report files: any of
    `tensorboard`, `mlflow`, `wandb`, `trackio` (a list or one name), or `none`. Each is its library's own client,
    pointed where its environment variables say (MLFLOW_TRACKING_URI, WANDB_MODE, TRACKIO_DIR, ...)."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value):
        # The Hugging Face spellings: one name, a list, or "none" for no tracker at all.
        names = [value] if isinstance(value, str) else value
        if isinstance(names, list) and "none" in names:
            if len(names) > 1:
                raise ValueError("report_to: none goes alone (drop none, or the other trackers)")
            return []
        return names


class DeltaArgs(BaseModel):
    """The delta report: what fine-tuning changed between base and tuned model."""

    model_config = GROUP

    delta_report: bool = True
    """End the run with report.md/.html and delta.json comparing base and tuned (task gain, forgetting, weights)."""
    general_text_file: str | None = None
    """UTF-8 text file (passages separated by blank lines) for forgetting; default: CPython's pydoc topics."""
    probe_files: list[str] = Field(default_factory=list)
    """Extra fact-recall probe sets (JSONL/JSON/CSV with `prompt` and `answer`), scored with the built-in set."""
    side_by_side_prompts: int = Field(8, ge=0)
    """Held-out prompts shown with base and tuned outputs side by side (classifiers: texts, label, both predictions)."""
    forgetting_benchmarks: list[str] = Field(default_factory=list)
    """lm-evaluation-harness tasks (`hellaswag`, `arc_easy`, ..., or your own under `benchmark_tasks_dir`) run on base
    and tuned for the forgetting report (causal LMs; `pip install 'deltatune[benchmarks]'`)."""
    benchmark_limit: int = Field(100, ge=1)
    """Samples of each benchmark task (the first ones, as lm-eval's `limit` takes them)."""
    benchmark_tasks_dir: str | None = None
    """A folder of lm-eval task YAML files (say over a local JSONL file), found by name like the built-in ones."""
    kl_samples: int = Field(8, ge=0)
    """Continuations sampled from the base model for the Monte-Carlo KL(base‖tuned); 0 skips it."""


GROUPS = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs, "memory": MemoryArgs, "parallel": ParallelArgs,
          "eval": EvalArgs, "output": OutputArgs, "delta": DeltaArgs, "preference": PreferenceArgs}
# Flat YAML key -> the group that holds it (None: a top-level field of RunConfig).
KEY_GROUP: dict[str, str | None] = {"task": None, "seed": None} | {
    (info.alias or name): group for group, cls in GROUPS.items() for name, info in cls.model_fields.items()}
# config.yaml lists the keys in this order (the order of the flat config before it was grouped).
FLAT_ORDER = [
    "model", "method", "task", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "freeze_layers",
    "trainable_modules", "train_file", "validation_file", "validation_split", "test_file", "format",
    "max_seq_length", "train_on_inputs", "learning_rate", "weight_decay", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "max_tokens_per_batch",
    "gradient_accumulation_steps", "warmup_ratio", "warmup_steps", "lr_scheduler_type", "max_grad_norm", "seed",
    "bf16", "early_stopping_patience", "parallelism", "fsdp_cpu_offload", "ddp_timeout", "packing",
    "gradient_checkpointing", "torch_compile", "optimizer_in_backward", "optimizer_state_dtype",
    "output_dir", "overwrite_output_dir", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "max_nonfinite_steps", "metric", "metric_pattern",
    "metric_schema", "max_new_tokens", "delta_report", "general_text_file", "probe_files", "side_by_side_prompts",
    "kl_samples", "allow_pickle", "trust_remote_code", "report_to", "forgetting_benchmarks", "benchmark_limit",
    "benchmark_tasks_dir", "loss_type", "beta", "simpo_gamma", "orpo_lambda", "chat_template",
    "chat_template_kwargs", "train_on_reasoning", "reasoning_format", "add_special_tokens",
    "datasets", "columns", "max_eval_samples", "dataset_num_proc", "streaming", "torch_dtype",
]
assert sorted(FLAT_ORDER) == sorted(KEY_GROUP), "every key is dumped exactly once"


class RunConfig(BaseModel):
    """A whole run: the objective, the seed, and one group of settings per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task = "sft"
    """Objective: `sft` trains a causal LM on the assistant turns of conversations; `text` continues pre-training on raw
    text packed into blocks; `classification` trains a sequence classifier on text/label records; `preference` tunes a
    causal LM on chosen/rejected response pairs (DPO, IPO, SimPO, ORPO: `loss_type`)."""
    seed: int = 42
    """Seeds the data split, shuffling and initialisation."""
    model: ModelArgs = ModelArgs()
    data: DataArgs = DataArgs()
    train: TrainArgs = TrainArgs()
    memory: MemoryArgs = MemoryArgs()
    parallel: ParallelArgs = ParallelArgs()
    eval: EvalArgs = EvalArgs()
    output: OutputArgs = OutputArgs()
    delta: DeltaArgs = DeltaArgs()
    preference: PreferenceArgs = PreferenceArgs()

    @model_validator(mode="after")
    def _check_across_groups(self) -> "RunConfig":
        method, memory = self.model.method, self.memory
        if self.data.train_file is None and self.data.datasets is None:
            raise ValueError("train_file is required (a data file or dataset), or datasets: (a weighted list of them)")
        if self.data.train_file is not None and self.data.datasets is not None:
            raise ValueError("train_file and datasets: both name the training data; keep one")
        if self.data.streaming and (self.train.max_steps <= 0 or self.data.datasets is not None):
            raise ValueError("streaming: true needs max_steps (a stream's length is not known in advance) and one "
                             "train_file (not datasets:)")
        if self.data.streaming and self.data.validation_split > 0 and not self.data.validation_file:
            raise ValueError("streaming: true cannot hold out a share of a stream: give validation_file, or set "
                             "validation_split: 0")
        if self.parallel.fsdp_cpu_offload and self.parallel.parallelism != "fsdp":
            raise ValueError("fsdp_cpu_offload: true needs parallelism: fsdp (DDP keeps a full model on each device)")
        if memory.optimizer_in_backward and self.train.max_grad_norm > 0:
            raise ValueError("optimizer_in_backward updates each weight as soon as its gradient is ready, so the "
                             "global gradient norm cannot be clipped: set max_grad_norm: 0 with it")
        if memory.optimizer_state_dtype != "float32" and self.parallel.parallelism == "fsdp":
            raise ValueError(f"optimizer_state_dtype: {memory.optimizer_state_dtype} does not work with parallelism: "
                             "fsdp, whose sharded parameters it cannot chunk (use parallelism: ddp or "
                             "optimizer_state_dtype: float32)")
        if self.model.torch_dtype not in ("auto", "float32") and method == "qlora":
            raise ValueError(f"torch_dtype: {self.model.torch_dtype} does not apply to method qlora (4-bit base)")
        if self.model.torch_dtype not in ("auto", "float32") and (why := stored_dtype_conflict(self)):
            raise ValueError(f"torch_dtype: {self.model.torch_dtype} {why}")
        return self

    def flat(self) -> dict:
        """Every key with its value, flat as in YAML and in FLAT_ORDER (config.yaml, checkpoints)."""
        values = {"task": self.task, "seed": self.seed}
        for group in GROUPS:
            values.update(getattr(self, group).model_dump(by_alias=True))
        return {key: values[key] for key in FLAT_ORDER}

    def with_overrides(self, **changes) -> "RunConfig":
        """A new config with some flat keys changed (validated again); this one stays as it is."""
        return build_config({**self.flat(), **changes}, "overrides")


def stored_dtype_conflict(cfg: "RunConfig") -> str | None:
    """Why frozen weights kept in a lower dtype cannot go with the rest of the config, or None."""
    if cfg.parallel.parallelism == "fsdp":
        return "does not work with parallelism: fsdp, which shards every weight in one dtype (use ddp or float32)"
    if cfg.model.method == "dora" and cfg.model.lora_dropout > 0:  # peft's DoRA would keep float32 copies
        return "with method dora needs lora_dropout: 0 (set lora_dropout: 0, or float32)"
    return None


def default(key: str):
    """The default value of a flat key."""
    group = KEY_GROUP[key]
    cls = RunConfig if group is None else GROUPS[group]
    return next(info.default for name, info in cls.model_fields.items() if (info.alias or name) == key)


def eval_args(origin: str, **values) -> EvalArgs:
    """EvalArgs from other settings than a config file (the CLI's flags), checked by the same rules."""
    try:
        return EvalArgs.model_validate(values)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin)) from None


def build_config(raw: dict, origin: str) -> RunConfig:
    """Validate a flat mapping into a RunConfig, with errors that name the key."""
    raw = with_our_names(raw, origin)
    check_keys(raw, origin, KEY_GROUP)
    task = raw.get("task", "sft")
    if "model" not in raw and task in DEFAULT_MODEL:
        raw = {**raw, "model": DEFAULT_MODEL[task]}
    routed: dict[str, dict] = {group: {} for group in GROUPS}
    top = {}
    for key, value in raw.items():
        group = KEY_GROUP[key]
        (top if group is None else routed[group])[key] = value
    try:  # group by group, so an error's location is the flat key (or the group's own check)
        groups = {group: cls.model_validate(routed[group]) for group, cls in GROUPS.items()}
        return RunConfig(**top, **groups)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config file (or none) and apply `key=value` overrides on top of it."""
    raw: dict = {}
    origin = "command line"
    if path is not None:
        path = Path(path)
        origin = str(path)
        raw = read_mapping(path)
        check_keys(raw, str(path), KEY_GROUP)
        raw = rebase_paths(raw, path.parent)
    cli = parse_overrides(list(overrides))
    check_keys(cli, None, KEY_GROUP)
    return build_config({**raw, **cli}, origin)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config, every key, as YAML (written next to the run's outputs)."""
    return yaml.safe_dump(cfg.flat(), sort_keys=False)
