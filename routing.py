"""The second CoDyRA rows of Tables 1-2: each test image is routed to a learned domain, and takes
the prediction of the model right after that domain's task; one not routed takes the current
model's. Torch only; train.py keeps every task's per-image predictions, so a row is a lookup
in a `state` (new_state) that the checkpoint carries.

    route k of image x after task t:  k <= t, or NOT_LEARNED (-1): the model after task t answers
    oracle:  k = the image's own dataset j if j <= t        (gives Last2[j] = A[j][j], SPEC 4)
    ae:      one auto-encoder per learned domain on the frozen pretrained image features; k = the
             domain with the lowest reconstruction error among those whose threshold accepts x

The paper gives no details of its "domain-wise auto-encoders"; ours follow MoE-Adapters' DDAS (one
small auto-encoder per task on frozen CLIP image features, reconstruction error picks the task)."""
import torch
import torch.nn as nn

NOT_LEARNED = -1
AE = dict(hidden_ratio=4, steps=500, lr=1e-3)  # E -> E // 4 -> E, full-batch Adam
ROUTERS = {"ae": "the domain-wise auto-encoders",  # train.py --routing, as its report names them
           "oracle": "the oracle (each image to its own domain once learned)"}


@torch.no_grad()
def errors(ae, features):  # (N,) squared reconstruction error of every row of (N, E) features
    return (ae(features) - features).pow(2).sum(-1)


def fit(features, steps=AE["steps"], lr=AE["lr"]):
    """An auto-encoder of one domain's (N, E) training features, and its threshold: the largest
    error among those very features, so that every training image of the domain is accepted (no
    free parameter; held-out images of the domain may score above it). Seed the RNG first."""
    e, h = features.shape[1], features.shape[1] // AE["hidden_ratio"]  # E -> E // 4 -> E
    ae = nn.Sequential(nn.Linear(e, h), nn.ReLU(), nn.Linear(h, e)).to(features.device)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        (ae(features) - features).pow(2).sum(-1).mean().backward()
        optimizer.step()
    return ae.eval(), float(errors(ae, features).max())


def ae_route(errs, thresholds):
    """(N,) route of each image: errs (K, N) errors under the auto-encoders of the K domains
    learned so far, thresholds (K,). NOT_LEARNED where no threshold accepts the image."""
    accepted = errs <= torch.as_tensor(thresholds, dtype=errs.dtype)[:, None]      # (K, N)
    best = errs.masked_fill(~accepted, float("inf")).argmin(0)                      # (N,)
    return torch.where(accepted.any(0), best, torch.full_like(best, NOT_LEARNED))


def summary(routing_acc):
    """{"seen": mean % routed right over the cells t >= j, "unseen": over t < j (None if none)}:
    of a T x T matrix of routing accuracies, rows t, columns j."""
    cells = [(t >= j, a) for t, row in enumerate(routing_acc) for j, a in enumerate(row)]
    seen, unseen = [a for s, a in cells if s], [a for s, a in cells if not s]
    return {"seen": sum(seen) / len(seen), "unseen": sum(unseen) / len(unseen) if unseen else None}


# --- the bookkeeping of a run (train.py): what the routed rows look up, and the rows
def new_state():
    """What the routed rows look up: per finished task, the (N,) predicted labels on every test
    set; per auto-encoder (one a task), its weights, threshold and (N,) errors per test set."""
    return {"predictions": [], "autoencoders": [], "thresholds": [], "errors": []}


def add_domain(state, features, test_features):
    """Fit the next domain's auto-encoder on its (N, E) frozen pretrained training features and
    keep it in `state`, with its threshold and its errors on each test set's (N, E) features."""
    ae, threshold = fit(features)
    state["autoencoders"].append({k: v.cpu() for k, v in ae.state_dict().items()})
    state["thresholds"].append(threshold)
    state["errors"].append([errors(ae, f).cpu() for f in test_features])


def add_rows(routed, state, t, labels):
    """Append row t to each router's ("ae", "oracle") accuracy matrix and routing accuracy (% of
    dataset j's images routed to j once learned, else to none) in `routed`: lookups in `state`;
    labels: the N labels of each test set. The top-1 is written as eval.evaluate's, so the
    oracle's Last2[j] equals A[j][j] to the bit."""
    for name, rows in routed.items():
        row, right = [], []
        for j, y in enumerate(map(torch.as_tensor, labels)):
            own = j if j <= t else NOT_LEARNED  # the right route of dataset j's images
            route = (torch.full((len(y),), own, dtype=torch.long) if name == "oracle" else
                     ae_route(torch.stack([e[j] for e in state["errors"][:t + 1]]),
                              state["thresholds"][:t + 1]))
            pred = state["predictions"][t][j].clone()  # the model after task k for route k
            for k in range(t):
                pred[route == k] = state["predictions"][k][j][route == k]
            row.append(100.0 * (pred == y).float().mean().item())
            right.append(100.0 * (route == own).float().mean().item())
        rows["acc"].append(row)
        rows["routing_accuracy"].append(right)
