"""Example: fine-tune deep prompts and LoRA adapters through a local 2-peer swarm; the loss falls step by step.

The peers serve the frozen blocks; the client trains only its own small tensors (deep prompts of every block and
rank-4 LoRA on q_proj / v_proj), sending them with each forward / backward request. The task: memorize a few
short sentences about blockswarm (with the demo model's tokenizer), or fixed random token sequences on a random
tiny Llama when no model with a tokenizer is at hand. With --dp, the same training runs with DP-SGD (per-example
gradients through the swarm, clipping, noise, Poisson sampling) and prints the (ε, δ) spent. At the end it saves
the adapters (LoRA in PEFT's format) and prints the exposure ledger: which peer saw which blocks' activations.

    python scripts/finetune_example.py                 # demo-model/ if present, else a random tiny Llama
    python scripts/finetune_example.py --dp --steps 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402

from privacy import DPSGD, DPConfig  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402

SENTENCES = [
    "blockswarm peers serve frozen transformer blocks.",
    "The client trains its own prompts and adapters.",
    "Gradients flow back through every peer of the route.",
    "Differential privacy bounds what the weights reveal.",
]


def make_data(model_dir: Path, vocab_size: int, length: int) -> torch.Tensor:
    """[N, length] token ids: the sentences if the model has a tokenizer, else fixed random sequences."""
    if (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows = [tokenizer(s).input_ids[:length] for s in SENTENCES]
        length = min(len(r) for r in rows)  # equal lengths: the swarm takes no padding
        return torch.tensor([r[:length] for r in rows])
    return torch.randint(0, vocab_size, (len(SENTENCES), length), generator=torch.Generator().manual_seed(0))


def per_example_losses(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def train(model, data: torch.Tensor, steps: int, lr: float, dp: bool) -> None:
    params = model.tuning.named_trainables()
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    dpsgd = None
    if dp:
        # Tiny data set: meant to show the mechanics (and ε growing), not a useful privacy level.
        config = DPConfig(
            dataset_size=len(data), sample_rate=0.5, max_grad_norm=1.0, delta=1e-2, noise_multiplier=0.3, seed=0
        )
        dpsgd = DPSGD(params, config)
    for step in range(1, steps + 1):
        if dpsgd is None:
            loss = per_example_losses(model, data).mean()
            loss.backward()
            note = ""
        else:
            batch = dpsgd.sample_batch()
            grads = None
            if batch:  # per-example replicas of every trainable: exact per-example gradients in one backward
                grads, _ = model.tuning.per_example_gradients(
                    dpsgd.per_example(len(batch)), lambda rows=batch: per_example_losses(model, data[rows])
                )
            report = dpsgd.step(grads)
            with torch.no_grad():
                loss = per_example_losses(model, data).mean()  # on all the data, for the printout only
            note = f"  batch {report.batch_size}  eps {report.epsilon:.2f} (delta {report.delta})"
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step:3d}  loss {loss.item():.4f}{note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: demo-model/ if present)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--dp", action="store_true", help="train with DP-SGD")
    parser.add_argument("--save", type=Path, default=None, help="where to save the adapters (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-finetune-") as tmp:
        model_dir = args.model
        if model_dir is None:
            demo = REPO / "demo-model"
            model_dir = demo if (demo / "config.json").exists() else make_random_checkpoint(Path(tmp) / "tiny")
        with LocalSwarm(model_dir, peers=2, threads_per_peer=1, extra_args=["--log-level", "WARNING"]) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
            try:
                data = make_data(model_dir, model.config.vocab_size, length=16)
                print(f"model {model_dir}, {len(data)} sequences of {data.shape[1]} tokens, peers {swarm.spans}")
                model.tuning.add_deep_prompts(args.prompt_len)
                model.tuning.add_lora(rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
                train(model, data, args.steps, args.lr, args.dp)
                save = args.save or Path(tmp) / "adapters"
                model.tuning.save_pretrained(save, base_model_name_or_path=str(model_dir))
                print(f"saved adapters to {save}: {sorted(p.name for p in save.iterdir())}")
                print(model.exposure_ledger.format_table())
            finally:
                model.shutdown()


if __name__ == "__main__":
    main()
