"""Privacy audit: how much of a client's prompts the peers of the swarm can recover, and what a defence costs.

    python scripts/privacy_audit.py [--model demo-model] [--local-blocks 1] [--noise 1 2 4 8] [--lora-steps 30]

For the model and each client configuration (no local blocks; `--local-blocks` local blocks; the same with a LoRA
the client trained on its local blocks; and with privacy="noise" at each multiplier of `--noise`), runs
privacy.audit: the first remote peer inverts the hidden states it receives, position by position, with the public
weights ("nearest"; "ml" knows the noise distribution; "_N_copies" averages N noisy copies of the same prompt, as
when a prompt is sent again), and with `--backward-prompts` the last remote peer recovers the labels of a fine-tuning
step from the gradient it receives. Perplexity is measured on held-out text through the same client code path, so
recovery and utility come from the same run. Prints one JSON object.

Text: a checkpoint made by scripts/make_demo_model.py (it holds demo_model.json) uses that script's held-out
documents for the prompts and the perplexity, and its training documents for the LoRA; any other checkpoint uses
uniformly random token ids (perplexity then means little).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from blocks.checkpoint import open_checkpoint  # noqa: E402
from privacy.audit import ClientSetup, audit_client, build_client, perplexity  # noqa: E402
from privacy.defence import DEFAULT_NOISE_MULTIPLIER  # noqa: E402


def windows(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length, (count, 1), generator=torch.Generator().manual_seed(seed))
    return stream[starts + torch.arange(length)]


def text_streams(model: Path, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(held-out token stream, training token stream, where they come from)."""
    if (model / "demo_model.json").is_file():
        from make_demo_model import HELDOUT_EVERY, collect_corpus, encode_stream
        from transformers import AutoTokenizer

        docs = collect_corpus()
        tokenizer = AutoTokenizer.from_pretrained(model)
        heldout = encode_stream(tokenizer, [d for i, d in enumerate(docs) if not i % HELDOUT_EVERY])
        train = encode_stream(tokenizer, [d for i, d in enumerate(docs) if i % HELDOUT_EVERY])
        return heldout, train, "demo held-out documents"
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, vocab_size, (100_000,), generator=generator),
        torch.randint(0, vocab_size, (100_000,), generator=generator),
        "uniformly random token ids",
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "demo-model")
    parser.add_argument("--local-blocks", type=int, default=1, help="local blocks of the defended configurations")
    parser.add_argument("--noise", type=float, nargs="*", default=[2.0, 4.0, 8.0], help="privacy noise points")
    parser.add_argument("--lora-steps", type=int, default=30, help="0: no configuration with a local LoRA")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--copies", type=int, default=4, help="noisy copies the averaging attacker gets")
    parser.add_argument("--backward-prompts", type=int, default=2, help="fine-tuning steps attacked; 0: none")
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    vocab_size = open_checkpoint(args.model).config.vocab_size
    heldout_stream, train_stream, source = text_streams(args.model, vocab_size, args.seed)
    prompts = windows(heldout_stream, args.prompts, args.prompt_length, args.seed)
    heldout = windows(heldout_stream, args.heldout_windows, args.window, args.seed + 1)
    train = windows(train_stream, 256, args.window, args.seed + 2)

    k = args.local_blocks
    setups = [ClientSetup(local_blocks=0), ClientSetup(local_blocks=k)]
    if args.lora_steps:
        setups.append(ClientSetup(local_blocks=k, lora_steps=args.lora_steps, seed=args.seed))
    setups += [ClientSetup(local_blocks=k, privacy=m, seed=args.seed) for m in args.noise]
    results = []
    for setup in setups:
        noisy = setup.privacy != "off"
        # The costly attacks (averaged copies, the backward path) at the default noise point only, to keep it short
        default_point = setup.privacy == DEFAULT_NOISE_MULTIPLIER
        results.append(
            audit_client(
                args.model,
                setup,
                prompts,
                heldout,
                train,
                scorings=("nearest", "ml") if noisy else ("nearest",),
                copies=args.copies if default_point else 1,
                backward_prompts=args.backward_prompts if default_point or not noisy else 0,
            )
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress: the run takes minutes
    skipped = perplexity(build_client(args.model, ClientSetup(local_blocks=k), skip_remote=True), heldout)
    undefended = next(r["perplexity"] for r in results if r["local_blocks"] == k and r["privacy"] == "off")
    for r in results:
        r["perplexity_vs_undefended"] = round(r["perplexity"] / undefended, 4)
        # The share of what the remote blocks add to the model (in log perplexity) that the configuration loses: the
        # cost that does not depend on how much a model owes to its remote blocks (the demo model: little)
        r["remote_contribution_lost"] = round(
            math.log(r["perplexity"] / undefended) / math.log(skipped / undefended), 4
        )
    report = {
        "model": str(args.model),
        "text": source,
        "prompts": args.prompts,
        "prompt_length": args.prompt_length,
        "heldout_windows": [args.heldout_windows, args.window],
        "perplexity_undefended": undefended,
        # the model without its remote blocks: what is left of its quality if their contribution were lost entirely
        "perplexity_remote_blocks_skipped": round(skipped, 3),
        "configs": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
