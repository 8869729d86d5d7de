"""The multiple-instance benchmark (bench/mil.py): its bags, and its arms' exact gradients."""

from __future__ import annotations

import pytest
import torch

from bench import mil


def _indexed_pool(n: int, positives: int) -> mil.Pool:
    """A pool whose image k is filled with the number k, the first ``positives`` positive."""
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 8, 8)
    return mil.Pool(images.clone(), torch.arange(n) < positives)


@pytest.mark.parametrize("n", [1, 5, 50])
def test_bags_are_balanced_and_positive_exactly_when_they_hold_the_digit(n: int) -> None:
    pool = _indexed_pool(200, positives=20)
    bags = mil.make_bags(pool, 10, n, torch.Generator().manual_seed(0))
    assert [label for _, label in bags] == [1.0, 0.0] * 5
    for bag, label in bags:
        assert bag.shape == (n, 1, 8, 8)
        index = bag[:, 0, 0, 0].long()
        nines = int(pool.positive[index].sum())
        assert (nines > 0) == (label == 1.0)
        assert nines <= max(1, round(mil.FRACTION * n)), "too many positives for MIL"
        assert len(set(index.tolist())) == n, "an image twice in one bag"


def test_test_pool_shares_no_image_with_the_training_pool() -> None:
    train, test = mil.digit_pools(seed=0)
    assert len(train.images) + len(test.images) == 1797
    seen = {img.numpy().tobytes(): k for k, img in enumerate(train.images)}
    assert not [img for img in test.images if img.numpy().tobytes() in seen]
    assert 0 < int(test.positive.sum()) < int(train.positive.sum())


@pytest.mark.parametrize("strategy", ["recompute", "stream"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_cnn_and_attention_gradients_equal_the_full_graph(strategy: str, chunk: int) -> None:
    pool = mil.digit_pools(seed=0)[0]
    bag, label = mil.make_bags(pool, 1, 7, torch.Generator().manual_seed(1))[0]
    bag = bag.double()
    want = mil.build_arm("full graph", seed=3, chunk=chunk, dtype=torch.float64)
    got = mil.build_arm(strategy, seed=3, chunk=chunk, dtype=torch.float64)
    torch.testing.assert_close(got(bag), want(bag), rtol=1e-12, atol=1e-12)
    names = [n for n, _ in want.named_parameters()]
    for name, g, w in zip(
        names, mil.gradients(got, bag, label), mil.gradients(want, bag, label), strict=True
    ):
        if name != "attention.w.bias":  # zero: a softmax ignores a shift of its scores
            assert w.abs().max() > 1e-8, f"{name}: no gradient reaches it, the check is empty"
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"{name} ({strategy})")


def test_stream_runs_one_backward_per_sum_not_per_jacobian_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A chunk of 4 embeddings of d = 32 has 4 x 32 Jacobian rows but attention needs only
    # 2d + 1 = 65 weighted sums: one backward each is the cheaper way. (A bag of 7 spans
    # chunks of 4; a bag inside one chunk keeps no sums: it is re-run in the backward.)
    pool = mil.digit_pools(seed=0)[0]
    bag, _ = mil.make_bags(pool, 1, 7, torch.Generator().manual_seed(1))[0]
    net = mil.build_arm("stream", seed=0, chunk=4)
    calls = []
    grad = torch.autograd.grad

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return grad(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.autograd, "grad", counted)
    net(bag)
    # per chunk: the 2d + 1 sums, and the attention's own gradient of its scores (grad_e a_i)
    assert len(calls) == 2 * (2 * mil.DIM + 2)
    calls.clear()
    mil.build_arm("stream", seed=0, chunk=7)(bag)
    assert not calls, "a bag inside one chunk runs no backward in the forward"
