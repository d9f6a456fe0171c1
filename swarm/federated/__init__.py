"""Federated fine-tuning with user-level DP (DP-FedAvg): several clients train one shared adapter, round by round.

Each client trains the shared tensors (its ``model.tuning`` prompts / LoRA) through the swarm on its own data; the
frozen blocks stay with the swarm's peers. A round of the run named ``run_name`` (matchmaking by that name in the
client's hivemind DHT, the update exchange on hivemind's P2P, client to client):

1. join: announce ``{run}.fed.{round}.join`` (subkey: own peer ID) and train locally from the current adapter θ;
   the update Δ = θ_local − θ is clipped to ``clip_norm`` C and the client adds its share of Gaussian noise,
   N(0, (σC)²/m) per coordinate, m = ``min_clients``; θ is restored.
2. exchange: every client fetches every announced client's noisy update (a P2P stream) and checks it: length
   (the adapter's shape), finiteness, and norm ≤ C + the noise's norm bound (`norm_bound`). A failure is logged
   with the sender and the reason, and the update is left out.
3. agree: each client publishes which updates it accepted (``{run}.fed.{round}.agree``); the round's set is the
   clients whose updates every confirming client accepted (`agreed_set`). Every client that confirms computes the
   same set, so every participant ends the round with the same adapter θ + mean of those updates (summed in
   peer-ID order: the same bits everywhere).

Churn: a client that leaves mid-round is missing in step 2 (its stream fails or times out) or never confirms in
step 3, and the round completes with the others after the timeouts. A round with fewer than m clients releases
nothing (the adapter stays), since its noise would be below σC. A late joiner downloads the current adapter and
round from a member of the run (`sync`) before its first round.

Privacy (see privacy.federated_accounting): the released adapters are (ε, δ)-DP with respect to any one client's
whole data set, accounted per round with the clients that actually took part (noise multiplier σ·sqrt(k/m)).
Trust assumptions: clients are honest-but-curious (they follow the protocol, add their noise and do not lie in
their confirmations); a client that adds its noise and then drops out only lowers the round's noise if fewer than
m remain, and then the round is void. Fellow participants see each update with only its own noise share
(`exchange_epsilon`), and the peers serving the blocks see hidden states as in any fine-tuning (privacy package).

Robust aggregation: a norm-bounded mean (see `swarm.federated.updates`); the all-to-all exchange costs O(n²·d)
bytes in all, fine for the 3-10 clients it targets.

Modules: `config` (FederatedConfig), `errors`, `updates` (the pure steps on adapter vectors), `wire` (the exchange's
messages, used by both sides), `client` (FederatedClient, RoundResult).
"""

from swarm.federated.client import FederatedClient, RoundResult
from swarm.federated.config import FederatedConfig
from swarm.federated.errors import FederatedConfigError, FederatedError, RejectedUpdate
from swarm.federated.updates import (
    aggregate,
    agreed_set,
    check_update,
    clip_update,
    digest,
    flatten,
    noise_share,
    norm_bound,
    unflatten_into,
)
from swarm.federated.wire import PROTOCOL_VERSION, STATE_ROUND, FetchRequest, VectorReply

__all__ = [
    "PROTOCOL_VERSION",
    "STATE_ROUND",
    "FederatedClient",
    "FederatedConfig",
    "FederatedConfigError",
    "FederatedError",
    "FetchRequest",
    "RejectedUpdate",
    "RoundResult",
    "VectorReply",
    "aggregate",
    "agreed_set",
    "check_update",
    "clip_update",
    "digest",
    "flatten",
    "noise_share",
    "norm_bound",
    "unflatten_into",
]
