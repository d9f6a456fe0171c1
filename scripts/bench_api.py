"""Benchmark: the OpenAI-compatible endpoint (swarm-api) against the Python client, on the same swarm in one run.

Starts 2 peers on 127.0.0.1, a `swarm-api` process and a Python client, then alternates the same greedy generation
(same prompt, same max tokens: the same tokens) through the Python client (model.generate with a streamer) and
through the endpoint (the `openai` package, streamed), for 1 and 4 concurrent requests. One JSON line per (client,
concurrency): median time to first token (ms), median decode tokens/s of one request (tokens after the first over the
time after the first), aggregate tokens/s (all requests' tokens over the wall time of the round), and the tokens per
request. The last line compares the two: the endpoint's extra time to first token and its tokens/s ratio.

    python scripts/bench_api.py [--model DIR] [--new-tokens 64] [--rounds 3] [--concurrency 1 4]

Without --model it uses the demo model (scripts/make_demo_model.py; made once in about two minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from api_process import ApiProcess  # noqa: E402
from local_swarm import LocalSwarm  # noqa: E402
from make_demo_model import make_demo_model  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402

# The demo model's greedy continuation of this prompt runs to 64 tokens and beyond (a longer prompt may end at once).
PROMPT = "Return the"


class TokenTimes(BaseStreamer):
    """Arrival time of every generated token (generate's first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def python_request(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """(start, arrival time of each token) of one greedy generation through the Python client."""
    streamer = TokenTimes()
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    return began, streamer.times


def api_request(client, model_name: str, new_tokens: int) -> tuple[float, list[float]]:
    """(start, arrival time of each text chunk) of the same generation through the endpoint; the token count comes
    from the usage chunk, and chunk times stand for token times (a chunk is sent per token that adds text)."""
    began = time.perf_counter()
    times: list[float] = []
    tokens = 0
    stream = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if len(times) < tokens:  # tokens that added no text (held back, or special): spread over the measured span
        times = [*times, *[times[-1]] * (tokens - len(times))]
    return began, times


def run_round(request: Callable[[], tuple[float, list[float]]], concurrency: int) -> list[tuple[float, list[float]]]:
    results: list[tuple[float, list[float]] | None] = [None] * concurrency
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency)

    def run(i: int) -> None:
        try:
            barrier.wait(60)
            results[i] = request()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def summarize(name: str, concurrency: int, rounds: list[list[tuple[float, list[float]]]]) -> dict:
    ttft, decode, aggregate, tokens = [], [], [], []
    for results in rounds:
        for began, times in results:
            ttft.append((times[0] - began) * 1000)
            if len(times) > 1 and times[-1] > times[0]:
                decode.append((len(times) - 1) / (times[-1] - times[0]))
            tokens.append(len(times))
        start = min(b for b, _ in results)
        end = max(t[-1] for _, t in results)
        aggregate.append(sum(len(t) for _, t in results) / (end - start))
    return {
        "client": name,
        "concurrency": concurrency,
        "ttft_ms_median": round(statistics.median(ttft), 1),
        "decode_tokens_per_s_median": round(statistics.median(decode), 1) if decode else None,
        "aggregate_tokens_per_s_median": round(statistics.median(aggregate), 1),
        "tokens_per_request": statistics.median(tokens),
        "requests": len(ttft),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir with a tokenizer (default: the demo model)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    import openai

    model_dir = Path(args.model) if args.model else make_demo_model(REPO / "demo-model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    workdir = Path(tempfile.mkdtemp(prefix="blockswarm-bench-api-"))
    with LocalSwarm(model_dir, peers=2, extra_args=["--log-level", "WARNING"], workdir=workdir) as swarm:
        limit = ["--max-concurrent-requests", str(max(args.concurrency)), "--log-level", "WARNING"]
        with ApiProcess(model_dir, swarm.initial_peers, workdir, limit) as api:
            client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="none", max_retries=0, timeout=300)
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
            model_name = model_dir.name
            try:
                # warm-up: the first request of each pays for routing, connections, lazy imports
                python_request(model, ids, 4)
                api_request(client, model_name, 4)
                lines = []
                for concurrency in args.concurrency:
                    py_rounds, api_rounds = [], []
                    by_python = lambda: python_request(model, ids, args.new_tokens)  # noqa: E731
                    by_api = lambda: api_request(client, model_name, args.new_tokens)  # noqa: E731
                    for _ in range(args.rounds):  # alternate, so that load changes hit both alike
                        py_rounds.append(run_round(by_python, concurrency))
                        api_rounds.append(run_round(by_api, concurrency))
                    py = summarize("python", concurrency, py_rounds)
                    http = summarize("api", concurrency, api_rounds)
                    for line in (py, http):
                        print(json.dumps(line), flush=True)
                    lines.append(
                        {
                            "compare": "api_vs_python",
                            "concurrency": concurrency,
                            "extra_ttft_ms": round(http["ttft_ms_median"] - py["ttft_ms_median"], 1),
                            "decode_tokens_per_s_ratio": round(
                                http["decode_tokens_per_s_median"] / py["decode_tokens_per_s_median"], 3
                            ),
                            "aggregate_tokens_per_s_ratio": round(
                                http["aggregate_tokens_per_s_median"] / py["aggregate_tokens_per_s_median"], 3
                            ),
                        }
                    )
                for line in lines:
                    print(json.dumps(line), flush=True)
            finally:
                model.shutdown()


if __name__ == "__main__":
    main()
