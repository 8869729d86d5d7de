"""Multiple-instance learning on scikit-learn's digits: a CNN trained end to end through attention.

Instances are the 8x8 images of ``sklearn.datasets.load_digits`` (bundled with
scikit-learn, nothing is downloaded); a bag is positive when it holds at least one
``9``. The images are split into a training and a test pool first, so no image is in
both a training and a held-out bag. Classes are balanced; a positive bag of n images
holds between 1 and max(1, round(0.2 n)) nines, the rest are other digits.

The network (Ilse et al. 2018): a small CNN embeds each image (two 3x3 convolutions with
max pooling, a linear layer: d = 32 numbers), gated attention pools the bag's embeddings
to one d-vector, ``Linear(32, 1)`` reads the logit, and ``BCEWithLogits`` on it is the
loss. Three arms train the same network from the same initialisation:

* ``full graph``: plain torch, every image of the bag in one batched forward through the
  CNN, this module's own :class:`PlainAttention` (the same math as the plugin), one
  backward: what a user with enough memory writes;
* ``recompute`` and ``stream``: :class:`combframe.MultiPoseModel` with the CNN as the
  single-pose model, the ``gated_attention`` combination and the linear head as its
  ``comb_readout``, ``chunk`` images per pass.

Measured: peak live tensor bytes of one training step (forward and backward) against the
bag size (the torch profiler's memory events on the CPU,
:func:`combframe.testing.peak_tensor_bytes`); the step's wall time as a ratio to the full
graph's, medians of interleaved rounds; and held-out AUC after training each arm on the
same bags in the same order, for several seeds.

    python bench/mil.py             # the documented run: docs/bench/mil.md and mil.json
    python bench/mil.py --quick     # a smoke run of under a minute, into build/bench-quick

needs scikit-learn (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from combframe_attention import GatedAttention
from torch import Tensor, nn

import combframe

ARMS = ("full graph", "recompute", "stream")
DIM = 32
HIDDEN = 64
DIGIT = 9
FRACTION = 0.2
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """One run's sizes; ``quick`` and ``full`` below are the two the command line offers."""

    sizes: tuple[int, ...]
    chunk: int
    rounds: int
    seeds: tuple[int, ...]
    train_bags: int
    test_bags: int
    bag_size: int
    epochs: int
    lr: float
    precision: str  # of the accuracy runs: "float64" or "float32"


FULL = Settings(
    sizes=(10, 100, 500, 2000), chunk=64, rounds=5, seeds=(0, 1, 2),
    train_bags=160, test_bags=200, bag_size=50, epochs=6, lr=1e-3, precision="float64",
)  # fmt: skip
QUICK = Settings(
    sizes=(10, 100), chunk=16, rounds=2, seeds=(0,),
    train_bags=16, test_bags=16, bag_size=16, epochs=1, lr=1e-3, precision="float64",
)  # fmt: skip


# ---- data ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool:
    """Images (float, 0..1, shape (n, 1, 8, 8)) and whether each shows the chosen digit."""

    images: Tensor
    positive: Tensor  # bool (n,)


def digit_pools(seed: int, test_fraction: float = 0.4) -> tuple[Pool, Pool]:
    """The digits split into a training and a test pool, stratified by digit.

    Splitting the images before bags are drawn keeps every held-out bag made of images
    the network never saw.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    train_idx, test_idx = torch.from_numpy(train), torch.from_numpy(test)
    return (
        Pool(images[train_idx], labels[train_idx] == DIGIT),
        Pool(images[test_idx], labels[test_idx] == DIGIT),
    )


def make_bags(pool: Pool, count: int, n: int, gen: torch.Generator) -> list[tuple[Tensor, float]]:
    """``count`` bags of ``n`` images, half of them positive, alternating, with their labels.

    A positive bag holds k nines, k uniform in 1 .. max(1, round(FRACTION n)), and n - k
    other digits; a negative bag holds none. Within a bag images are drawn without
    replacement when the pool is large enough, with replacement otherwise; bags share
    images.
    """
    pos = torch.nonzero(pool.positive).squeeze(1)
    neg = torch.nonzero(~pool.positive).squeeze(1)
    most = max(1, round(FRACTION * n))
    bags = []
    for b in range(count):
        k = int(torch.randint(1, most + 1, (1,), generator=gen)) if b % 2 == 0 else 0
        idx = torch.cat([_draw(pos, k, gen), _draw(neg, n - k, gen)])
        idx = idx[torch.randperm(n, generator=gen)]
        bags.append((pool.images[idx], float(k > 0)))
    return bags


def _draw(indices: Tensor, k: int, gen: torch.Generator) -> Tensor:
    if k <= len(indices):
        return indices[torch.randperm(len(indices), generator=gen)[:k]]
    return indices[torch.randint(len(indices), (k,), generator=gen)]


# ---- the network --------------------------------------------------------------------
class Encoder(nn.Module):
    """An 8x8 image (or a batch of them) to a ``DIM``-vector each: the per-instance CNN."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 2 * 2, dim), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(-1, 1, 8, 8))


class PlainAttention(nn.Module):
    """Gated-attention pooling in plain torch: the full-graph reference of the plugin.

    The same math and parameters (names, shapes, order) as the ``gated_attention``
    combination (formula in ``docs/math.md``), written independently of it; applied to
    all of a bag's embeddings at once, ``(n, d) -> (d,)``.
    """

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.V, self.w = nn.Linear(dim, hidden), nn.Linear(hidden, 1)
        self.U = nn.Linear(dim, hidden)

    def forward(self, e: Tensor) -> Tensor:
        a = self.w(torch.tanh(self.V(e)) * torch.sigmoid(self.U(e))).squeeze(-1)
        return torch.softmax(a, dim=0) @ e


class FullGraph(nn.Module):
    """CNN, attention and head over a whole bag in one graph; ``forward(bag)`` is the logit."""

    def __init__(self, encoder: Encoder, attention: PlainAttention, readout: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.attention, self.readout = encoder, attention, readout

    def forward(self, bag: Tensor) -> Tensor:
        return self.readout(self.attention(self.encoder(bag))).reshape(())


class Chunked(nn.Module):
    """The same network as :class:`combframe.MultiPoseModel`: a bag's images are its poses."""

    def __init__(self, wrapped: combframe.MultiPoseModel) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, bag: Tensor) -> Tensor:
        return self.wrapped(bag)[0].reshape(())


def build_arm(arm: str, seed: int, chunk: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network of ``arm`` with the initialisation of ``seed`` (the same for every arm)."""
    torch.manual_seed(seed)
    encoder, attention, readout = Encoder(), PlainAttention(), nn.Linear(DIM, 1)
    if arm == "full graph":
        return FullGraph(encoder, attention, readout).to(dtype)
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    pooling = GatedAttention(dim=DIM, hidden=HIDDEN)
    pooling.load_state_dict(attention.state_dict())
    wrapped = combframe.MultiPoseModel(
        encoder, pooling, strategy=arm, chunk_size=chunk, comb_readout=readout
    )
    return Chunked(wrapped).to(dtype)


def loss_of(net: nn.Module, bag: Tensor, label: float) -> Tensor:
    """Binary cross-entropy of the bag's logit against its label."""
    logit = net(bag)
    return nn.functional.binary_cross_entropy_with_logits(logit, logit.new_tensor(label))


def gradients(net: nn.Module, bag: Tensor, label: float) -> list[Tensor]:
    """One step's gradients of every parameter (CNN, attention, head, in that order)."""
    net.zero_grad(set_to_none=True)
    loss_of(net, bag, label).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


def worst_difference(nets: dict[str, nn.Module], bag: Tensor, label: float) -> float:
    """Largest gradient difference of any arm to the full graph, relative per parameter.

    Each parameter's difference is divided by its largest reference entry, or by 1/1000 of
    the largest entry of any parameter where that is larger: the attention's ``w.bias``
    has a zero gradient up to rounding (a softmax ignores a common shift of its scores).
    """
    grads = {arm: gradients(net, bag, label) for arm, net in nets.items()}
    ref = grads["full graph"]
    floor = 1e-3 * max(float(r.abs().max()) for r in ref)
    worst = 0.0
    for got in grads.values():
        if [g.shape for g in got] != [r.shape for r in ref]:
            raise SystemExit("the arms' parameters differ in shape or order")
        for g, r in zip(got, ref, strict=True):
            scale = max(float(r.abs().max()), floor, 1e-30)
            worst = max(worst, float((g - r).abs().max()) / scale)
    return worst


# ---- memory and time against the bag size -----------------------------------------
def scaling_case(pool: Pool, n: int, s: Settings, seed: int) -> dict[str, Any]:
    """Peak memory and interleaved step times of every arm on one positive bag of ``n``."""
    from _timing import interleaved

    from combframe.app.memory import measure_step

    bag, label = make_bags(pool, 1, n, torch.Generator().manual_seed(seed))[0]
    nets = {arm: build_arm(arm, seed, s.chunk) for arm in ARMS}
    agreement = worst_difference(nets, bag, label)
    if agreement > 1e-3:
        raise SystemExit(f"n={n}: the arms disagree with the full graph: {agreement:.2e}")
    steps = {arm: (lambda net=net: gradients(net, bag, label)) for arm, net in nets.items()}
    memory = {arm: measure_step(step)[1] for arm, step in steps.items()}
    times = interleaved(steps, s.rounds, random.Random(seed))
    return {"n": n, "memory": memory, "time": times, "agreement": agreement}


# ---- accuracy -----------------------------------------------------------------------
def train_arm(
    arm: str,
    seed: int,
    train: Sequence[tuple[Tensor, float]],
    test: Sequence[tuple[Tensor, float]],
    s: Settings,
) -> dict[str, Any]:
    """Train one arm (Adam, one bag per step, the same order for every arm); held-out AUC."""
    from sklearn.metrics import roc_auc_score

    dtype = getattr(torch, s.precision)
    net = build_arm(arm, seed, s.chunk, dtype)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for _ in range(s.epochs):
        total = 0.0
        for i in torch.randperm(len(train), generator=order).tolist():
            opt.zero_grad(set_to_none=True)
            bag, label = train[i]
            loss = loss_of(net, bag.to(dtype), label)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total / len(train))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        scores = [float(net(bag.to(dtype))) for bag, _ in test]
    auc = float(roc_auc_score([y for _, y in test], scores))
    return {"arm": arm, "seed": seed, "auc": auc, "losses": losses, "seconds": seconds}


def accuracy(s: Settings, arms: Sequence[str] = ARMS) -> list[dict[str, Any]]:
    """Every arm at every seed, on the seed's split and bags."""
    rows = []
    for seed in s.seeds:
        train_pool, test_pool = digit_pools(seed)
        gen = torch.Generator().manual_seed(seed)
        train = make_bags(train_pool, s.train_bags, s.bag_size, gen)
        test = make_bags(test_pool, s.test_bags, s.bag_size, gen)
        for arm in arms:
            rows.append(train_arm(arm, seed, train, test, s))
            r = rows[-1]
            print(f"seed {seed} {arm}: AUC {r['auc']:.4f}, last loss {r['losses'][-1]:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
    return rows


# ---- the report ---------------------------------------------------------------------
def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def _med(v: Sequence[float]) -> float:
    return statistics.median(v)


def summary(results: dict[str, Any]) -> dict[str, float]:
    """The largest AUC and final-loss differences between arms at one seed, and memory growth."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in results["accuracy"]:
        by_seed.setdefault(r["seed"], []).append(r)
    auc = max((max(r["auc"] for r in rs) - min(r["auc"] for r in rs)) for rs in by_seed.values())
    loss = max(
        (max(r["losses"][-1] for r in rs) - min(r["losses"][-1] for r in rs))
        for rs in by_seed.values()
    )
    prev, last = results["scaling"][-2:]
    out = {"max_auc_difference": auc, "max_final_loss_difference": loss}
    for arm in ARMS:
        grow = last["memory"][arm] - prev["memory"][arm]
        out[f"bytes_per_image_{arm}"] = grow / (last["n"] - prev["n"])
    return out


def _span(results: dict[str, Any], arm: str) -> str:
    ratios = [_med(c["time"][arm]) / _med(c["time"]["full graph"]) for c in results["scaling"]]
    return f"{min(ratios):.1f}-{max(ratios):.1f}x the full graph"


def report(results: dict[str, Any]) -> str:
    """``mil.md``: what was run, the three tables and what they say."""
    s, sm = results["settings"], results["summary"]
    prev, last = results["scaling"][-2:]
    p_cnn = results["parameters"]["cnn"]
    stream_note = (
        "stream's peak comes while a chunk is back-propagated once per sum, above that "
        "graph at these sizes, so it hardly grows. "
        if sm["bytes_per_image_stream"] < 0.5 * sm["bytes_per_image_recompute"]
        else ""
    )
    smaller = [
        c["n"] for c in results["scaling"] if c["memory"]["stream"] < c["memory"]["full graph"]
    ]
    below = f"below it from n = {smaller[0]} on" if smaller else "above it at every n measured here"
    lines = [
        "# Multiple-instance learning on digits: a CNN trained through gated attention",
        "",
        f"Made by `{results['command']}` (from the repository root; it sets one intra-op "
        f"thread itself) on {results['date']}: {results['machine']}, torch "
        f"{results['torch']}, in {results['seconds'] / 60:.1f} minutes, on a machine shared "
        "with other work (read the times as ratios measured side by side, not as absolute "
        "numbers). `--quick` is a smoke run of a few seconds. Needs scikit-learn (the "
        "`bench` extra). The raw results are in [mil.json](mil.json).",
        "",
        "Instances are the 1,797 bundled 8x8 images of scikit-learn's `load_digits`; a bag is "
        f"positive when it holds at least one {DIGIT}. The images are split (stratified, 60/40, "
        "per seed) into a training and a test pool before bags are drawn, so no held-out bag "
        f"shares an image with a training bag. Positive bags of n images hold 1 to "
        f"max(1, round({FRACTION} n)) nines (uniform), negative bags none; classes alternate "
        "(balanced). Network: two 3x3 convolutions (16 and 32 channels, ReLU, 2x2 max "
        f"pooling) and a linear layer embed each image in d = {DIM} numbers; gated attention "
        f"(hidden {HIDDEN}) pools them, $G = \\sum_i \\mathrm{{softmax}}(a)_i e_i$; "
        "`Linear(32, 1)` reads the logit; binary cross-entropy with logits is the loss. "
        "Everything, the CNN included, is trained end to end.",
        "",
        "Arms, built from the same initialisation at each seed:",
        "",
        "- **full graph**: plain torch, the whole bag in one batched CNN forward, the "
        "benchmark's own gated-attention module (the same math and weights as the plugin), "
        "one backward; every image's graph is alive at once;",
        "- **recompute** and **stream**: `combframe.MultiPoseModel(cnn, "
        f"GatedAttention(dim={DIM}, hidden={HIDDEN}), strategy=..., chunk_size={s['chunk']}, "
        "comb_readout=head)` with the shipped `gated_attention` plugin, the bag's images as "
        f"its poses, {s['chunk']} per pass.",
        "",
        "## Peak memory of one training step against the bag size",
        "",
        "Peak live tensor bytes during one step (forward and backward of one positive bag), "
        "above what was live before it: the torch profiler's memory events on the CPU "
        "(`combframe.testing.peak_tensor_bytes`). It counts activations, gradients and "
        "temporaries, not the weights or the bag itself.",
        "",
        "| bag size n | full graph (MiB) | recompute (MiB) | stream (MiB) "
        "| recompute / full graph | stream / full graph |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["scaling"]:
        m = c["memory"]
        ref = max(m["full graph"], 1)
        lines.append(
            f"| {c['n']} | {_mib(m['full graph'])} | {_mib(m['recompute'])} | "
            f"{_mib(m['stream'])} | {m['recompute'] / ref:.3f} | {m['stream'] / ref:.3f} |"
        )
    lines += [
        "",
        f"Between n = {prev['n']} and n = {last['n']} each further image adds "
        f"{sm['bytes_per_image_full graph'] / 1024:.2f} KiB to the full graph's peak (its "
        "CNN activations, kept for the backward), "
        f"{sm['bytes_per_image_recompute'] / 1024:.2f} KiB to recompute's and "
        f"{sm['bytes_per_image_stream'] / 1024:.2f} KiB to stream's. The CNN's graph under "
        f"recompute and stream is one chunk's ({s['chunk']} images; below {s['chunk']} a "
        "chunk is the whole bag) whatever the bag size; what still grows with n is the "
        "pooling's own graph, ordinary autograd on the n embeddings: gated attention keeps "
        f"$V e_i$, $U e_i$, their tanh, sigmoid and product, 5 x {HIDDEN} numbers "
        f"({5 * HIDDEN * 4 / 1024:.2f} KiB in float32) and the embedding's {DIM} per image. "
        f"{stream_note}A larger network per instance (a CNN on pathology tiles keeps "
        "megabytes per instance) widens the gap; the pooling's share does not change.",
        "",
        f"stream also keeps, per bag, 2d + 1 = {2 * DIM + 1} running sums of the CNN's "
        f"{p_cnn:,} parameters ({(2 * DIM + 1) * p_cnn * 4 / 2**20:.2f} MiB), the attention's "
        "online-softmax sums, and back-propagates each chunk once per sum: its peak is flat "
        f"in n but above the full graph's for small bags ({below}).",
        "",
        "## Time of one training step, as a ratio to the full graph",
        "",
        f"Medians of {s['rounds']} interleaved rounds (`bench/_timing.py`: every round runs "
        "each arm once, in a new random order), wall clock.",
        "",
        "| bag size n | full graph (ms) | recompute | stream |",
        "|---:|---:|---:|---:|",
    ]
    for c in results["scaling"]:
        ref = _med(c["time"]["full graph"])
        lines.append(
            f"| {c['n']} | {1e3 * ref:.1f} | {_med(c['time']['recompute']) / ref:.2f}x | "
            f"{_med(c['time']['stream']) / ref:.2f}x |"
        )
    worst = max(c["agreement"] for c in results["scaling"])
    lines += [
        "",
        f"recompute ({_span(results, 'recompute')}) runs each chunk's forward twice, once "
        "without a graph and once with it in the backward, plus its bookkeeping per chunk, "
        f"which weighs on a CNN this cheap. stream ({_span(results, 'stream')}) runs one "
        f"backward of each chunk per sum, {2 * DIM + 1} where the full graph runs one "
        "backward in all: for d = 32 pooled by attention recompute is the strategy to use."
        " stream's single pass pays for scalar outputs "
        "(one or two sums) and expensive forwards ([SchNet](schnet.md)). Steps of a few "
        "milliseconds on a shared machine move by up to a factor of two between runs of "
        "this command: read the order of the arms and the size of the gaps, not the digits.",
        "",
        "Before measuring, each bag's gradients of every arm were compared with the full "
        f"graph's: the largest difference, relative to the largest entry, was {worst:.1e} "
        "(float32).",
        "",
        "## Held-out accuracy after training",
        "",
        f"{s['train_bags']} training and {s['test_bags']} test bags of n = {s['bag_size']} "
        f"per seed, {s['epochs']} epochs of Adam (lr {s['lr']}) in {s['precision']}, one "
        "bag per step, the same bags in the same order for every arm; AUC of the test bags' "
        "logits (`sklearn.metrics.roc_auc_score`).",
        "",
        "| seed | " + " | ".join(f"{a} AUC" for a in ARMS) + " | "
        + " | ".join(f"{a} last-epoch loss" for a in ARMS) + " | "
        + " | ".join(f"{a} (s)" for a in ARMS) + " |",
        "|---:|" + "---:|" * (3 * len(ARMS)),
    ]  # fmt: skip
    for seed in s["seeds"]:
        rows = {r["arm"]: r for r in results["accuracy"] if r["seed"] == seed}
        lines.append(
            f"| {seed} | "
            + " | ".join(f"{rows[a]['auc']:.4f}" for a in ARMS) + " | "
            + " | ".join(f"{rows[a]['losses'][-1]:.4f}" for a in ARMS) + " | "
            + " | ".join(f"{rows[a]['seconds']:.0f}" for a in ARMS) + " |"
        )  # fmt: skip
    lines += [
        "",
        f"Largest difference between arms at one seed: AUC {sm['max_auc_difference']:.1e}, "
        f"last-epoch training loss {sm['max_final_loss_difference']:.1e}. The gradients of "
        "every arm are the full graph's up to rounding (the sums run in another order), so at "
        "the same seed the arms follow the same training run. The runs are in float64 to "
        "show it: in float32 the rounding differences, carried through every Adam step, grow "
        "where the loss leaves its plateau (the network finds the nines), and the arms' "
        "AUCs can then differ a little (0.9855 against 0.9815 for the full graph and "
        "recompute at seed 0 in a float32 trial with weight decay), as two float32 runs of "
        "the full graph summing in different orders would.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of under a minute")
    parser.add_argument("--out", type=Path, help="folder for mil.md and mil.json")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    start = time.perf_counter()
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs" / "bench")
    torch.set_num_threads(1)
    train_pool = digit_pools(0)[0]
    scaling = []
    for i, n in enumerate(s.sizes):
        scaling.append(scaling_case(train_pool, n, s, seed=i))
        c = scaling[-1]
        print(f"n={n}: " + ", ".join(
            f"{a} {_mib(c['memory'][a])} MiB {1e3 * _med(c['time'][a]):.1f} ms" for a in ARMS
        ), flush=True)  # fmt: skip
    results: dict[str, Any] = {
        "command": "python bench/mil.py" + (" --quick" if args.quick else ""),
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {platform.system()}",
        "torch": torch.__version__,
        "parameters": {
            "cnn": sum(p.numel() for p in Encoder().parameters()),
            "attention": sum(p.numel() for p in PlainAttention().parameters()),
            "head": DIM + 1,
        },
        "settings": asdict(s),
        "scaling": scaling,
        "accuracy": accuracy(s),
    }
    results["summary"] = summary(results)
    results["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "mil.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "mil.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
