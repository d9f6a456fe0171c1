"""Train the demo's small default model on this CPU, from text that every Python install already has.

Random weights print garbage, and nothing may be downloaded, so the demo trains its own tiny Llama: the corpus is the
docstrings of a fixed list of standard-library modules (English prose about programming, ~0.7 MB), the tokenizer is
a byte-level BPE trained on it, and training runs for a wall-clock budget (two minutes by default on two cores).
The result is a normal Hugging Face checkpoint directory that ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load.

    python scripts/make_demo_model.py OUT_DIR [--seconds S] [--seed N]

The marker file ``demo_model.json`` (training stats) is written last; a directory holding it is reused as is.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

MARKER = "demo_model.json"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
VOCAB_SIZE = 2048
SEQ_LEN = 128
# Measured on 2 cores, at equal tokens: batch 8 beats 16 (more updates), and 2e-3 beats 3e-3..1e-2 by a little.
BATCH_SIZE = 8
PEAK_LR = 2e-3
WARMUP_STEPS = 30
MIN_LR_FRACTION = 0.1
HELDOUT_EVERY = 20  # every 20th document is held out, to report a loss on text the model never trained on
PROMPTS = ("The", "Return the")

# Fixed order so that the corpus (and hence the tokenizer and the data stream) is the same on every run.
# Only modules that ship with every CPython build; optional C extensions (sqlite3, ssl, ...) are skipped if absent.
STDLIB_MODULES = (
    "builtins",
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "asyncio.events",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "binascii",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "collections.abc",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "doctest",
    "email",
    "email.message",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "logging.handlers",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "os.path",
    "pathlib",
    "pdb",
    "pickle",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "pydoc",
    "queue",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "unittest.mock",
    "urllib",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
)


def collect_corpus() -> list[str]:
    """Docstrings of the modules above and of their public classes, functions and methods, deduplicated, in order."""
    seen: set[str] = set()
    docs: list[str] = []

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= 16 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        add(module)
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            # Skip private names and re-exports (those are documented with the module that defines them).
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            add(obj)
            if inspect.isclass(obj):
                for member_name in sorted(vars(obj)):
                    member = vars(obj)[member_name]
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if not member_name.startswith("_") and (
                        inspect.isroutine(member) or inspect.isdatadescriptor(member)
                    ):
                        add(member)
    return docs


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text encodes (no unknown characters), and decoding gives back the exact input."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    # Prepend <s> like Llama tokenizers do, so that tokenizer(prompt) starts the way every training document starts.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,  # no dedicated pad token: padded positions are masked anyway
        model_max_length=512,  # the model's max_position_embeddings
        clean_up_tokenization_spaces=False,  # the cleanup rewrites " ." etc. and would break the round trip
    )


def check_round_trip(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> None:
    samples = [*docs[:50], "Return the value of x  (tabs\tand ünïcödé) -> {'a': 1}\n"]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if ids[0] != tokenizer.bos_token_id or back != text:
            raise RuntimeError(f"tokenizer round trip failed: {text[:60]!r} -> {ids[:5]}... -> {back[:60]!r}")


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """One long token stream: <s> doc </s> <s> doc </s> ..., so windows also teach where documents start and end."""
    ids: list[int] = []
    # The backend tokenizer directly: the wrapper warns about documents longer than model_max_length.
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += [tokenizer.bos_token_id, *encoding.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(data: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ_LEN, (batch, 1), generator=generator)
    return data[starts + torch.arange(SEQ_LEN)]


def build_model(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,  # even, so that the demo's two peers serve two blocks each
        num_attention_heads=4,  # head dim 64
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).to(torch.float32)


def bf16_autocast_is_fast() -> bool:
    """bf16 matmuls are ~1.4x faster on CPUs with native bf16 (AVX512-BF16/AMX) and much slower elsewhere."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lr_at(step: int, time_fraction: float) -> float:
    """Linear warmup over a fixed number of steps, then cosine decay over the time budget (training stops on time)."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    cosine = 0.5 * (1 + math.cos(math.pi * min(time_fraction, 1.0)))
    return PEAK_LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


def train(
    model: LlamaForCausalLM, data: torch.Tensor, seconds: float, seed: int, autocast: bool
) -> tuple[int, float, float]:
    """Train until `seconds` of wall-clock time have passed; returns (steps, smoothed final loss, elapsed seconds)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no weight decay on norm gains
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    smoothed = float("nan")
    step = 0
    start = time.perf_counter()
    elapsed = 0.0
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s{postfix}"
    # In a log file (no terminal) every redraw is a new chunk of text: redraw rarely there.
    interval = 0.5 if sys.stdout.isatty() else 15.0
    with tqdm(total=seconds, desc="training", bar_format=bar_format, file=sys.stdout, mininterval=interval) as bar:
        while elapsed < seconds:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, elapsed / seconds)
            batch = sample_windows(data, BATCH_SIZE, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = loss.item()
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"step {step}, loss {smoothed:.3f}", refresh=False)
            bar.update(min(elapsed, seconds) - bar.n)  # update() rate-limits redraws; set_postfix_str alone doesn't
    model.eval()
    return step, smoothed, elapsed


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, data: torch.Tensor, seed: int) -> float:
    windows = sample_windows(data, 32, torch.Generator().manual_seed(seed + 1))
    return sum(model(input_ids=w, labels=w).loss.item() for w in windows.split(8)) / 4


def word_fraction(text: str, vocabulary: set[str]) -> float:
    """Share of the sample's words that occur in the corpus: a cheap check that the model writes real words."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    return sum(w.lower() in vocabulary for w in words) / max(len(words), 1)


def make_demo_model(path: str | Path, *, seconds: float = 120.0, seed: int = 0) -> Path:
    """Train (or reuse, if `path` already holds a finished one) the demo model, and return its directory."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the demo's target: a two-core machine
    try:
        torch.manual_seed(seed)
        docs = collect_corpus()
        tokenizer = train_tokenizer(docs)
        check_round_trip(tokenizer, docs)
        train_docs = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]
        heldout_docs = [d for i, d in enumerate(docs) if not i % HELDOUT_EVERY]
        train_data = encode_stream(tokenizer, train_docs)
        heldout_data = encode_stream(tokenizer, heldout_docs)
        print(
            f"corpus: {len(docs)} docstrings, {sum(map(len, docs)) / 1e6:.2f} MB, "
            f"{len(train_data)} training tokens, vocab {len(tokenizer)}"
        )

        model = build_model(len(tokenizer), tokenizer)
        autocast = bf16_autocast_is_fast()
        steps, loss, elapsed = train(model, train_data, seconds, seed, autocast)
        heldout = heldout_loss(model, heldout_data, seed)
        print(f"trained {steps} steps in {elapsed:.0f}s: final loss {loss:.3f} (held-out {heldout:.3f})")

        model.generation_config = GenerationConfig(
            do_sample=True,
            temperature=0.8,
            top_k=40,
            max_new_tokens=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

        # Sample from the saved files, through the same loaders the demo uses.
        loaded = AutoModelForCausalLM.from_pretrained(path)
        loaded_tokenizer = AutoTokenizer.from_pretrained(path)
        vocabulary = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]{2,}", d)}
        samples = {}
        torch.manual_seed(seed)
        for prompt in PROMPTS:
            inputs = loaded_tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = loaded.generate(**inputs, max_new_tokens=60)
            samples[prompt] = loaded_tokenizer.decode(out[0], skip_special_tokens=True)
            print(f"--- sample ({word_fraction(samples[prompt], vocabulary):.0%} corpus words) ---\n{samples[prompt]}")

        stats = {
            "seconds": round(elapsed, 1),
            "steps": steps,
            "tokens_seen": steps * BATCH_SIZE * SEQ_LEN,
            "final_loss": round(loss, 4),
            "heldout_loss": round(heldout, 4),
            "seed": seed,
            "bf16_autocast": autocast,
            "corpus_docs": len(docs),
            "corpus_chars": sum(map(len, docs)),
            "train_tokens": len(train_data),
            "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "word_fraction": round(sum(word_fraction(s, vocabulary) for s in samples.values()) / len(samples), 3),
            "samples": samples,
        }
        (path / MARKER).write_text(json.dumps(stats, indent=2) + "\n")  # last: marks the directory as finished
    finally:
        torch.set_num_threads(threads)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to create (reused if already finished)")
    parser.add_argument("--seconds", type=float, default=120.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batch order")
    args = parser.parse_args(argv)
    path = make_demo_model(args.out_dir, seconds=args.seconds, seed=args.seed)
    print(f"demo model: {path}")


if __name__ == "__main__":
    main()
