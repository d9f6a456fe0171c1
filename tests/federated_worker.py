"""A federated client process for tests/test_federated.py: joins the swarm, then runs rounds on command.

Commands on the pipe (tuples): ("round", config kwargs, behaviour) -> a dict of the round's outcome;
("sync", config kwargs) -> the adapter after joining the run; ("stop",). Behaviours: "honest", "nan" / "huge"
(sends a poisoned update instead of its own), "hang" (reports "training" and then blocks until it is killed).
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from swarm.federated import FederatedClient, FederatedConfig, flatten


class PoisonClient(FederatedClient):
    """Sends a poisoned update (what a broken or malicious client could send) instead of its real one."""

    poison = "nan"

    def privatize(self, local: torch.Tensor) -> torch.Tensor:
        sent = super().privatize(local)
        if self.poison == "nan":
            sent[0] = float("nan")
            return sent
        return sent * 1000.0 + 1000.0


def local_train(model: Any, data: torch.Tensor, steps: int, lr: float) -> None:
    params = list(model.tuning.named_trainables().values())
    optimizer = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        logits = model(data).logits
        F.cross_entropy(logits[:, :-1].transpose(1, 2), data[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()


def main(conn: Connection, ckpt: str, initial_peers: list[str], index: int) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        Path(ckpt), initial_peers=initial_peers, refresh_period=0, check_rate=0.0
    )
    # the same initial adapter on every client (same seed); different data per client
    model.tuning.add_lora(rank=2, alpha=4, generator=torch.Generator().manual_seed(0))
    data = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(100 + index))
    clients: dict[str, FederatedClient] = {}
    conn.send(("ready", model.model.sequence.p2p.peer_id.to_base58()))
    try:
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            config = FederatedConfig(**command[1])
            behaviour = command[2] if len(command) > 2 else "honest"
            client = clients.get(config.run_name)
            if client is None:
                if behaviour in ("nan", "huge"):
                    client = PoisonClient.for_model(model, config)
                    client.poison = behaviour
                else:
                    client = FederatedClient.for_model(model, config)
                clients[config.run_name] = client.start()
            if command[0] == "sync":
                conn.send({"synced": client.sync(), "round": client.round, "adapter": flatten(client.params)})
                continue

            def train(behaviour: str = behaviour) -> None:
                if behaviour == "hang":
                    conn.send("training")
                    conn.recv()  # never answered: the test kills this process here
                local_train(model, data, steps=2, lr=0.5)

            before = flatten(client.params)
            result = client.run_round(train)
            conn.send(
                {
                    "peer": client.peer,
                    "completed": result.completed,
                    "participants": result.participants,
                    "rejected": result.rejected,
                    "missing": result.missing,
                    "local": result.local_update,
                    "sent": result.sent_update,
                    "before": before,
                    "after": flatten(client.params),
                    "digest": result.adapter_digest,
                    "privacy": result.privacy,
                    "noise_std": client.noise_std,
                }
            )
    finally:
        for client in clients.values():
            client.shutdown()
        model.shutdown()
