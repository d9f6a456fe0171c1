"""The demo: start a local swarm of 2 peers on 127.0.0.1, generate text through it with tokens streaming to the
terminal, and stop the peers.

    python scripts/demo.py ["prompt"] [--model DIR] [--max-new-tokens N] [--api [--api-port 8080]]

With --api it then also serves the model over the OpenAI-compatible API (swarm-api) on 127.0.0.1 until Ctrl-C.

Without --model it uses a small Llama trained on this machine's Python docstrings (made once, in about two minutes,
and cached in demo-model/): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from local_swarm import LocalSwarm  # noqa: E402
from make_demo_model import make_demo_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Return the")
    parser.add_argument("--model", default=None, help="checkpoint dir with a tokenizer (default: the demo model)")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api", action="store_true", help="then serve the OpenAI-compatible API until Ctrl-C")
    parser.add_argument("--api-port", type=int, default=8080, help="the API's port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from swarm import AutoDistributedModelForCausalLM

    model_dir = Path(args.model) if args.model else make_demo_model(REPO / "demo-model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"[demo] starting {args.peers} peers for {model_dir.name} on 127.0.0.1 ...", flush=True)
    started = time.perf_counter()
    with LocalSwarm(model_dir, peers=args.peers, extra_args=["--log-level", "WARNING"]) as swarm:
        for peer, span in zip(swarm.peers, swarm.spans, strict=True):
            print(f"[demo] peer ...{peer.info['peer_id'][-8:]} serves blocks {span[0]}:{span[1]}")
        print(f"[demo] swarm ready in {time.perf_counter() - started:.1f} s; generating:\n", flush=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            torch.manual_seed(args.seed)
            inputs = tokenizer(args.prompt, return_tensors="pt").input_ids
            began = time.perf_counter()
            out = model.generate(
                inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer, skip_special_tokens=True)
            )
            elapsed = time.perf_counter() - began
            new_tokens = out.shape[1] - inputs.shape[1]
            print(f"\n[demo] {new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tokens/s)")
            # The swarm must produce what transformers produces with the whole model in one place.
            local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            torch.manual_seed(args.seed)
            expected = local.generate(inputs, max_new_tokens=args.max_new_tokens)
            if not torch.equal(out, expected):
                n = min(out.shape[1], expected.shape[1])
                mismatch = (out[0, :n] != expected[0, :n]).nonzero()
                differs = int(mismatch[0]) if len(mismatch) else n
                sys.exit(f"[demo] error: the swarm's tokens differ from local transformers' from token {differs} on")
            print("[demo] the same tokens as local transformers running the whole model")
        finally:
            model.shutdown()
        if args.api:
            serve_api(model_dir, tokenizer, swarm.initial_peers, args.api_port, args.prompt, args.seed)
        print("[demo] stopping the peers ...", flush=True)
    print("[demo] done")


def serve_api(model_dir: Path, tokenizer, initial_peers: list[str], port: int, prompt: str, seed: int) -> None:
    """Run swarm-api in front of the demo's swarm, show that it answers, and keep it up until Ctrl-C."""
    import openai
    from api_process import ApiProcess
    from model_tools import TINY_CHAT_TEMPLATE

    workdir = Path(tempfile.mkdtemp(prefix="blockswarm-demo-api-"))
    args = ["--log-level", "WARNING"]
    if not getattr(tokenizer, "chat_template", None):  # the demo model has none: give it a minimal one
        (workdir / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
        args += ["--chat-template", str(workdir / "chat_template.jinja")]
    api = ApiProcess(model_dir, initial_peers, workdir, args, port=port)
    print(f"\n[demo] starting the OpenAI-compatible API (log: {api.log_file}) ...", flush=True)
    url = api.start().wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        answer = client.completions.create(
            model=model_dir.name, prompt=prompt, max_tokens=24, temperature=0.8, seed=seed
        )
        print(f"[demo] {url}/v1/completions answered: {prompt}{answer.choices[0].text.rstrip()}")
        print(f"[demo] serving {model_dir.name} at {url}/v1 until Ctrl-C; try:")
        print(
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{model_dir.name}", "messages": [{{"role": "user", "content": "{prompt}"}}], '
            f'"max_tokens": 32}}\''
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    finally:
        print("\n[demo] stopping the API ...", flush=True)
        api.stop()


if __name__ == "__main__":
    main()
