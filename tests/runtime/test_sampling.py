"""ringfuse.runtime.sampling: SamplingParams validation, the filtered distribution
(temperature, top-k, top-p) vs a reference written here and HF's warpers, row by row and
for a batch of rows with their own settings, the repetition penalty vs HF's processor, and
both selectors, select() and select_on_device() (greedy, seeded sampling, the draw's
distribution); select_on_device runs here on CPU tensors, and gpu-marked on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from ringfuse.runtime.sampling import (
    SamplingParams,
    _penalize_rows,
    apply_repetition_penalty,
    filtered_probs,
    filtered_probs_rows,
    select,
    select_on_device,
)

# the two selectors, as lists of token ids
SELECTORS = {"loop": select, "on_device": lambda *a: select_on_device(*a).tolist()}
selectors = pytest.mark.parametrize("select", list(SELECTORS.values()), ids=list(SELECTORS))

# ---- SamplingParams --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, exc",
    [
        ("max_new_tokens", 0, ValueError),
        ("max_new_tokens", -3, ValueError),
        ("max_new_tokens", 1.5, TypeError),
        ("max_new_tokens", True, TypeError),
        ("max_new_tokens", "8", TypeError),
        ("temperature", -1, ValueError),
        ("temperature", -1e-9, ValueError),
        ("temperature", float("nan"), (TypeError, ValueError)),
        ("temperature", float("inf"), (TypeError, ValueError)),
        ("temperature", "0.5", TypeError),
        ("temperature", None, TypeError),
        ("top_p", 0, ValueError),
        ("top_p", 0.0, ValueError),
        ("top_p", 1.5, ValueError),
        ("top_p", -0.1, ValueError),
        ("top_p", float("nan"), (TypeError, ValueError)),
        ("top_k", -1, ValueError),
        ("top_k", 2.0, TypeError),
        ("top_k", False, TypeError),
        ("repetition_penalty", 0, ValueError),
        ("repetition_penalty", -1.2, ValueError),
        ("repetition_penalty", True, TypeError),
        ("seed", "x", TypeError),
        ("seed", 1.0, TypeError),
        ("seed", True, TypeError),
        ("seed", -1, ValueError),
        ("seed", 2**64, ValueError),
        ("stop", [""], TypeError),
        ("stop", "", TypeError),
        ("stop", ["ok", 3], TypeError),
        ("stop", 3, TypeError),
        ("stop", 0, TypeError),
    ],
)
def test_params_reject(name, value, exc):
    with pytest.raises(exc, match=name):
        SamplingParams(**{name: value})


def test_params_accept_and_normalize():
    p = SamplingParams()
    assert p.greedy and p.stop == () and p.max_new_tokens == 128
    assert SamplingParams(stop="abc").stop == ("abc",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=("a",)).stop == ("a",)
    assert SamplingParams(stop=None).stop == ()
    # a set's iteration order depends on the process's hash seed: sorted, so that tensor-parallel
    # ranks (which compare requests) and repeated runs see the same parameters
    assert SamplingParams(stop={"zz", "a", "b"}).stop == ("a", "b", "zz")
    p = SamplingParams(max_new_tokens=1, temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.3, seed=0)
    assert not p.greedy
    assert SamplingParams(top_p=1e-6, repetition_penalty=0.5, temperature=0).greedy
    with pytest.raises(Exception):  # frozen
        p.temperature = 1.0


# ---- filtered_probs vs a reference -----------------------------------------------------


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp64, by the definitions: top-k keeps every token whose logit is >= the k-th largest
    (ties kept); top-p then keeps the smallest set of most probable tokens whose mass
    reaches top_p (a token is kept when the mass strictly above it is < top_p: HF's
    "cumulative ascending prob <= 1 - top_p is removed"), at least one token."""
    x = logits.double() / temperature
    V = x.numel()
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        kth = sorted(x.tolist(), reverse=True)[top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        p = torch.where(keep, x, -math.inf).softmax(-1).tolist()
        order = sorted(range(V), key=lambda i: -p[i])
        above = 0.0
        for rank, i in enumerate(order):
            if above >= top_p and rank > 0:
                keep[i] = False
            above += p[i]
    return torch.where(keep, x, -math.inf).softmax(-1)


def _near_top_p_boundary(logits, temperature, top_k, top_p) -> bool:
    """True when some token's mass-above sits within 1e-5 of top_p (fp32 vs fp64 may then
    legitimately disagree on it)."""
    if top_p >= 1.0:
        return False
    x = logits.double() / temperature
    if 0 < top_k < x.numel():
        x = torch.where(x >= x.topk(top_k).values[-1], x, -math.inf)
    p = x.softmax(-1).sort(descending=True).values
    above = p.cumsum(0) - p
    return bool(((above - top_p).abs() < 1e-5).any())


def _logit_cases():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(50, generator=g) * 2
    yield "ties", torch.randint(-6, 6, (50,), generator=g).float() / 2  # many equal logits
    yield "peaked", torch.cat([torch.tensor([12.0]), torch.randn(30, generator=g)])
    yield "flat", torch.zeros(20)
    yield "with -inf", torch.where(torch.rand(40, generator=g) < 0.3, -math.inf, torch.randn(40, generator=g))


@pytest.mark.parametrize("case, logits", list(_logit_cases()), ids=[c for c, _ in _logit_cases()])
def test_filtered_probs_vs_reference(case, logits):
    checked = 0
    for temperature in (0.3, 1.0, 1.7):
        for top_k in (0, 1, 3, 10, logits.numel() - 1, logits.numel(), 1000):
            for top_p in (1.0, 0.95, 0.7, 0.3, 0.01):
                if _near_top_p_boundary(logits, temperature, top_k, top_p):
                    continue
                p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
                out = filtered_probs(logits.clone(), p)
                ref = _reference_probs(logits, temperature, top_k, top_p)
                what = (case, temperature, top_k, top_p)
                assert out.dtype == torch.float32 and out.shape == logits.shape, what
                assert torch.isfinite(out).all() and (out >= 0).all(), what
                assert out.sum().item() == pytest.approx(1.0, abs=1e-5), what
                # the same distribution up to which of several equal logits the nucleus
                # boundary cuts: same sorted probabilities, and kept tokens never less likely
                # than dropped ones; elementwise equal when the kept sets agree
                assert torch.allclose(out.double().sort().values, ref.sort().values, atol=1e-6), what
                kept = out > 0
                if (~kept).any():  # every kept token at least as likely as every dropped one
                    assert logits[kept].min() >= logits[~kept].max(), what
                if kept.sum() == (ref > 0).sum() and torch.equal(kept, ref > 0):
                    assert torch.allclose(out.double(), ref, atol=1e-6), what
                else:  # only a tie at the boundary may pick a different (equal) token
                    assert case in ("ties", "flat"), what
                checked += 1
    assert checked >= 30


def test_filtered_probs_vs_hf_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        logits = torch.randn(64, generator=g) * 3
        temperature = [0.5, 1.0, 1.5][trial % 3]
        top_k = [0, 1, 5, 20][trial % 4]
        top_p = [1.0, 0.9, 0.5, 0.2, 0.05][trial % 5]
        if _near_top_p_boundary(logits, temperature, top_k, top_p):
            continue
        scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        ref = scores.softmax(-1)[0]
        out = filtered_probs(logits.clone(), SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        assert torch.equal(out > 0, ref > 0), (trial, temperature, top_k, top_p)
        assert torch.allclose(out, ref, atol=1e-6), (trial, temperature, top_k, top_p)


def test_filtered_probs_keeps_one_token():
    logits = torch.tensor([0.0, 30.0, 1.0, 2.0])
    out = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert out.tolist() == [0.0, 1.0, 0.0, 0.0]
    out = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=1, top_p=0.5))
    assert out.tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("case, logits", list(_logit_cases()), ids=[c for c, _ in _logit_cases()])
def test_filtered_probs_rows_gives_each_row_its_own_filters(case, logits):
    """One batch whose rows have every combination of settings: each row is the row-by-row
    filtered_probs of its settings (the same kept set off the top-p boundary, values within
    fp32 rounding: the batch's softmax may sum in another order)."""
    settings = [(t, k, p) for t in (0.3, 1.0, 1.7) for k in (0, 1, 3, 10, logits.numel(), 1000)
                for p in (1.0, 0.95, 0.7, 0.3, 0.01)]  # fmt: skip
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    batch = filtered_probs_rows(logits.expand(len(params), -1).clone(), params)
    assert batch.shape == (len(params), logits.numel()) and batch.dtype == torch.float32
    checked = 0
    for row, (p, (t, k, top_p)) in enumerate(zip(params, settings)):
        one = filtered_probs(logits.clone(), p)
        assert torch.isfinite(batch[row]).all() and batch[row].sum().item() == pytest.approx(1.0, abs=1e-5)
        if _near_top_p_boundary(logits, t, k, top_p):
            continue
        assert torch.equal(batch[row] > 0, one > 0), (case, t, k, top_p)
        assert torch.allclose(batch[row], one, atol=1e-6, rtol=1e-5), (case, t, k, top_p)
        checked += 1
    assert checked >= 30


def test_filtered_probs_rows_without_filters_is_the_softmax():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(9))
    params = [SamplingParams(temperature=t) for t in (0.5, 1.0, 2.0)]
    want = torch.stack([(logits[r] / p.temperature).softmax(-1) for r, p in enumerate(params)])
    assert torch.allclose(filtered_probs_rows(logits.clone(), params), want, atol=1e-7)


# ---- repetition penalty ----------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_vs_hf(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(100, generator=g) * 3
    logits[7] = 0.0
    seen = torch.tensor([3, 7, 3, 99, 0, 42, 42, 5], dtype=torch.int64)  # repeats included
    row = logits.clone()
    apply_repetition_penalty(row, seen, penalty)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
    assert torch.equal(row, ref)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[seen] = False
    assert torch.equal(row[untouched], logits[untouched])
    # the formula: positive logits divided, negative multiplied
    for i in seen.unique().tolist():
        v = logits[i].item()
        assert row[i].item() == pytest.approx(v / penalty if v >= 0 else v * penalty, rel=1e-6)


def test_penalize_rows_is_the_row_penalty_bit_for_bit():
    """The batched penalty: rows with seen lists of different lengths (repeats included),
    others untouched; each penalized row equal to apply_repetition_penalty's."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 60, generator=g) * 3
    seen = {0: torch.tensor([3, 3, 59, 0]), 2: torch.tensor([7]), 3: torch.tensor([1, 2, 5, 8, 13, 21, 34, 55, 1])}
    penalty = {0: 1.3, 2: 0.4, 3: 1e30}
    out = logits.clone()
    _penalize_rows(out, list(seen), list(seen.values()), list(penalty.values()))
    for r in range(4):
        want = logits[r].clone()
        if r in seen:
            apply_repetition_penalty(want, seen[r], penalty[r])
        assert torch.equal(out[r], want), r


# ---- select ----------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@selectors
def test_select_greedy_rows_give_argmax(select):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 40, generator=g)
    greedy = SamplingParams()
    assert select(logits, [greedy] * 5, [None] * 5, [None] * 5) == logits.argmax(-1).tolist()
    # mixed with sampled rows: the greedy rows still give argmax
    sampled = SamplingParams(temperature=1.0, seed=0)
    params = [greedy, sampled, greedy, sampled, greedy]
    gens = [None, _gen(0), None, _gen(1), None]
    out = select(logits, params, [None] * 5, gens)
    assert [out[i] for i in (0, 2, 4)] == [logits[i].argmax().item() for i in (0, 2, 4)]
    assert all(0 <= t < 40 for t in out)
    # top_k = 1 sampling is greedy too
    one = SamplingParams(temperature=2.0, top_k=1)
    assert select(logits, [one] * 5, [None] * 5, [_gen(i) for i in range(5)]) == logits.argmax(-1).tolist()


@selectors
def test_select_greedy_ties_and_nan_pick_as_torch_argmax(select):
    """All-greedy batches take numpy's argmax (a tenth of torch's time on a vocab row): the
    first maximum on ties, the first NaN where there is one, as torch.argmax."""
    logits = torch.zeros(4, 49152)
    logits[0, [7, 3000, 40000]] = 2.0  # a three-way tie
    logits[1, [9, 11]] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = -float("inf")  # every token impossible: the first
    logits[3, [0, 1]] = torch.tensor([-0.0, 0.0])  # -0 == 0: the first
    want = logits.argmax(-1).tolist()
    assert want == [7, 9, 0, 0]
    assert select(logits, [SamplingParams()] * 4, [None] * 4, [None] * 4) == want
    assert select(logits[1:2], [SamplingParams()], [None], [None]) == [9]
    # dtypes numpy lacks (bf16) and tensors that require grad take torch's argmax
    assert select(logits.bfloat16(), [SamplingParams()] * 4, [None] * 4, [None] * 4) == want
    assert select(logits.clone().requires_grad_(), [SamplingParams()] * 4, [None] * 4, [None] * 4) == want


@selectors
def test_select_greedy_with_repetition_penalty(select):
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    p = SamplingParams(repetition_penalty=1.5)
    assert select(logits, [p], [torch.tensor([1])], [None]) == [2]  # 3.0 / 1.5 < 2.9
    assert select(logits, [p], [None], [None]) == [1]
    assert select(logits, [p], [torch.tensor([], dtype=torch.int64)], [None]) == [1]
    assert logits[0, 1] == 3.0  # the caller's logits are left alone


@selectors
def test_select_same_seed_same_tokens(select):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(30, 50, generator=g)
    p = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=123)

    def run(seed, other_rows):
        gen = _gen(seed)
        toks = []
        for step in range(30):  # one row per step, as the engine does per decode step
            rows = [logits[step]] + [logits[(step + j) % 30] for j in range(1, other_rows + 1)]
            params = [p] + [SamplingParams(temperature=1.0)] * other_rows
            gens = [gen] + [_gen(1000 + step + j) for j in range(other_rows)]
            toks.append(select(torch.stack(rows), params, [None] * len(rows), gens)[0])
        return toks

    a, b = run(123, 0), run(123, 0)
    assert a == b
    assert run(123, 3) == a  # whatever shares the batch
    assert run(124, 0) != a


@selectors
def test_select_distribution(select):
    logits = torch.tensor([[0.5, -0.3, 1.2]])
    expected = torch.softmax(logits[0].double(), -1)
    p = SamplingParams(temperature=1.0, seed=0)
    gen = _gen(0)
    n = 4000
    counts = torch.zeros(3)
    for _ in range(n):
        counts[select(logits, [p], [None], [gen])[0]] += 1
    freq = counts.double() / n
    assert (freq - expected).abs().max() < 0.03, (freq, expected)


@selectors
def test_select_distribution_filtered(select):
    """temperature 2 and top_k 2: the third token never comes; the two others in the
    ratio exp((l0 - l1) / 2)."""
    logits = torch.tensor([[1.0, 0.2, -0.5]])
    p = SamplingParams(temperature=2.0, top_k=2, seed=5)
    gen = _gen(5)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[select(logits, [p], [None], [gen])[0]] += 1
    assert counts[2] == 0
    expected = 1 / (1 + math.exp(-0.4))
    assert abs(counts[0].item() / 2000 - expected) < 0.04


# ---- extreme but valid values ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
@selectors
def test_tiny_temperature_is_greedy(temperature, select):
    """A temperature whose quotient would overflow fp32 is argmax, not a NaN distribution."""
    logits = torch.tensor([[1.0, 30.0, 29.9, -5.0], [100.0, -100.0, 99.0, 0.0]])
    p = SamplingParams(temperature=temperature, seed=0)
    assert p.greedy
    assert select(logits, [p, p], [None, None], [_gen(0), _gen(1)]) == [1, 0]
    probs = filtered_probs(logits[0].clone(), p)  # called directly, still finite
    assert torch.isfinite(probs).all() and probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_small_temperature_samples_finite_probs():
    logits = torch.tensor([1.0, 3.0, 2.9999, -1.0])
    for t in (1e-5, 1e-4, 1e-3):
        probs = filtered_probs(logits.clone(), SamplingParams(temperature=t, top_p=0.9))
        assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0, abs=1e-6), t


@pytest.mark.parametrize("penalty", [1e-40, 1e-30, 1e30, 1e38])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-3])
@selectors
def test_extreme_repetition_penalty_stays_finite(penalty, temperature, select):
    logits = torch.tensor([[2.0, -3.0, 5.0, 0.5, -1.0]])
    seen = torch.tensor([0, 1, 4])
    row = logits[0].clone()
    apply_repetition_penalty(row, seen, penalty)
    assert torch.isfinite(row).all(), row
    p = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=0)
    for _ in range(20):
        tok = select(logits, [p], [seen], [_gen(0)])[0]
        assert 0 <= tok < 5
    if penalty < 1:  # a tiny penalty favours the seen tokens: the seen positive one wins greedy
        assert select(logits, [SamplingParams(repetition_penalty=penalty)], [seen], [None]) == [0]
    if not p.greedy:
        probs = filtered_probs(row, p)
        assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_seeds_over_the_whole_uint64_range():
    """Any seed in [0, 2**64) works and is deterministic; seeds past 2**63 are torch's uint64
    seeds (the same stream as torch.Generator().manual_seed of that value)."""
    from ringfuse.runtime.sampling import generator

    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        a, b = torch.rand(4, generator=generator(seed)), torch.rand(4, generator=generator(seed))
        assert torch.equal(a, b), seed
        assert generator(seed).initial_seed() == seed
    logits = torch.randn(1, 50, generator=_gen(0))
    p = SamplingParams(temperature=1.0, seed=2**64 - 1)
    assert select(logits, [p], [None], [generator(p.seed)]) == select(logits, [p], [None], [generator(p.seed)])


def test_select_on_device_batch_rows_draw_from_their_own_distributions():
    """Three sampled rows with different settings and a greedy one in one batch, drawn
    3000 times: each row's frequencies follow its own filtered distribution, and a token
    the filters removed never comes."""
    logits = torch.tensor([[0.5, -0.3, 1.2, 0.0], [1.0, 0.2, -0.5, 0.4], [2.0, 1.5, 0.1, -1.0], [0.0, 3.0, 1.0, 2.0]])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=2),
              SamplingParams(temperature=1.5, top_p=0.6), SamplingParams()]  # fmt: skip
    gens = [_gen(1), _gen(2), _gen(3), None]
    want = filtered_probs_rows(logits[:3].clone(), params[:3]).double()
    n = 3000
    counts = torch.zeros(3, 4, dtype=torch.float64)
    for _ in range(n):
        tokens = select_on_device(logits, params, [None] * 4, gens)
        assert tokens[3].item() == 1  # greedy
        counts[torch.arange(3), tokens[:3]] += 1
    assert (counts[want == 0] == 0).all()
    assert ((counts / n - want).abs().max() < 0.035), (counts / n, want)


@pytest.mark.gpu
def test_select_on_device_on_a_gpu():
    """On CUDA tensors with CUDA generators: greedy rows (penalized too) as select() gives
    them, a seed repeats its tokens, and the draws follow the distribution."""
    dev = torch.device("cuda")
    from ringfuse.runtime.sampling import generator

    logits = torch.randn(4, 300, generator=_gen(8)) * 2
    greedy, pen = SamplingParams(), SamplingParams(repetition_penalty=1.8)
    seen = [None, torch.tensor([5, 17, 5]), None, None]
    params = [greedy, pen, greedy, pen]
    seen[3] = logits[3].topk(3).indices  # the penalty moves the argmax
    want = select(logits, params, seen, [None] * 4)
    assert select_on_device(logits.to(dev), params, seen, [None] * 4).tolist() == want
    p = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)

    def draws():
        g = generator(11, dev)
        return [select_on_device(logits[:1].to(dev), [p], [None], [g]).item() for _ in range(20)]

    assert draws() == draws()
    small = torch.tensor([[0.5, -0.3, 1.2]], device=dev)
    g = generator(0, dev)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[select_on_device(small, [SamplingParams(temperature=1.0)], [None], [g]).item()] += 1
    assert (counts / 3000 - torch.softmax(small[0].cpu().double(), -1).float()).abs().max() < 0.035
