import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vnm_compile as vnm
from vnm_compile.format import MAX_ENUMERATED_SUBSETS

PATTERNS = st.sampled_from([(1, 4), (2, 5), (4, 6), (4, 8), (8, 5), (16, 8), (16, 16), (32, 7)])
SHAPES = st.tuples(st.integers(1, 70), st.integers(1, 70))


def retained(scores, mask):
    return float((scores.double() * mask).sum())


def brute_force_best(scores, v, m):
    """Best retained score over every choice of 4 columns per block (rows keep their best 2)."""
    rows, cols = scores.shape
    padded = torch.zeros(-(-rows // v) * v, -(-cols // m) * m, dtype=torch.float64)
    padded[:rows, :cols] = scores
    total = 0.0
    for r0 in range(0, padded.shape[0], v):
        for c0 in range(0, padded.shape[1], m):
            block = padded[r0 : r0 + v, c0 : c0 + m]
            total += max(
                float(block[:, list(subset)].topk(2, dim=1).values.sum())
                for subset in itertools.combinations(range(m), 4)
            )
    return total


@settings(max_examples=60, deadline=None)
@given(PATTERNS, SHAPES, st.sampled_from(["optimal", "l1"]), st.integers(0, 2**31))
def test_mask_is_vnm_for_any_shape(pattern, shape, rule, seed):
    v, m = pattern
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    mask = vnm.vnm_mask(scores, v, m, column_select=rule)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert vnm.is_vnm(mask, v, m)


@settings(max_examples=60, deadline=None)
@given(PATTERNS, SHAPES, st.integers(0, 2**31))
def test_optimal_never_worse_than_l1(pattern, shape, seed):
    v, m = pattern
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) ** 3
    optimal = retained(scores, vnm.vnm_mask(scores, v, m, "optimal"))
    l1 = retained(scores, vnm.vnm_mask(scores, v, m, "l1"))
    assert optimal >= l1 - 1e-9 * max(1.0, l1)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(1, 4), (1, 7), (2, 5), (2, 6), (4, 8), (4, 7)]), st.integers(1, 9), st.integers(1, 17),
       st.integers(0, 2**31))
def test_optimal_equals_brute_force_on_small_blocks(pattern, rows, cols, seed):
    v, m = pattern
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = vnm.vnm_mask(scores, v, m, "optimal")
    assert retained(scores, mask) == pytest.approx(brute_force_best(scores, v, m), rel=1e-6)


@pytest.mark.parametrize("v,m", [(64, 8), (16, 6), (4, 5)])
def test_mask_does_not_depend_on_the_search_chunk(monkeypatch, v, m):
    """The search works chunk by chunk (small on the CPU, large on a GPU): every chunking, the same mask."""
    from vnm_compile import format

    scores = torch.rand(3 * v + 5, 37 * m + 3, generator=torch.Generator().manual_seed(v + m)) ** 3
    masks = []
    for chunk in (v, 1000, 16384, 1 << 19):
        monkeypatch.setitem(format._SEARCH_CHUNK, "cpu", chunk)
        masks.append(vnm.vnm_mask(scores, v, m, "optimal"))
    assert all(torch.equal(mask, masks[0]) for mask in masks[1:])


@pytest.mark.parametrize("v,m", [(64, 5), (64, 8), (16, 6), (32, 16)])
def test_sparsity_is_exact_on_divisible_shapes(v, m):
    scores = torch.rand(2 * v, 3 * m * 4)
    for rule in ("optimal", "l1"):
        mask = vnm.vnm_mask(scores, v, m, rule)
        assert int(mask.sum()) * m == 2 * mask.numel()
        assert (mask.view(2 * v, -1, m).sum(-1) == 2).all()


@pytest.mark.parametrize("v", [1, 16, 64])
def test_v_2_4_is_plain_2_4(v):
    weight = torch.randn(3 * v, 40)
    expected = torch.zeros(3 * v, 10, 4, dtype=torch.bool)
    expected.scatter_(2, weight.abs().view(3 * v, 10, 4).topk(2, dim=-1).indices, True)
    for rule in ("optimal", "l1"):
        assert torch.equal(vnm.vnm_mask(weight.abs(), v, 4, rule), expected.view(3 * v, 40))


def test_large_m_falls_back_to_l1_with_warning():
    scores = torch.rand(32, 64)
    assert math.comb(16, 4) > MAX_ENUMERATED_SUBSETS
    with pytest.warns(UserWarning, match="l1"):
        mask = vnm.vnm_mask(scores, 16, 16, "optimal")
    assert torch.equal(mask, vnm.vnm_mask(scores, 16, 16, "l1"))


def test_is_vnm_rejects_bad_masks():
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, :3] = True  # 3 kept in one row of a group
    assert not vnm.is_vnm(mask, 4, 8)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, [0, 1]] = mask[1, [2, 3]] = mask[2, [4, 5]] = True  # 6 columns in one block
    assert not vnm.is_vnm(mask, 4, 8)
    assert vnm.is_vnm(mask, 1, 8)  # fine once every row is its own block


@pytest.mark.parametrize("bad", [dict(v=3), dict(v=0), dict(m=3), dict(m=300), dict(v=2.0)])
def test_bad_patterns_raise(bad):
    args = dict(v=16, m=8) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} "):
        vnm.vnm_mask(torch.rand(16, 16), **args)


@pytest.mark.parametrize("scores,match", [
    (torch.rand(4), "2-D"), (-torch.rand(16, 16), "non-negative"),
    (torch.full((16, 16), float("nan")), "finite"), (torch.ones(16, 16, dtype=torch.int32), "floating"),
])
def test_bad_scores_raise(scores, match):
    with pytest.raises(ValueError, match=match):
        vnm.vnm_mask(scores, 16, 8)


@settings(max_examples=60, deadline=None)
@given(PATTERNS, SHAPES, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2**31))
def test_round_trip_is_bit_exact(pattern, shape, dtype, seed):
    v, m = pattern
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    compressed = vnm.VNMWeight.from_dense(weight, v, m)
    mask = compressed.mask()
    assert vnm.is_vnm(mask, v, m)
    assert torch.equal(compressed.to_dense(), weight * mask)
    assert torch.equal(mask, vnm.vnm_mask(weight.abs().float(), v, m))
    again = vnm.VNMWeight.from_dense(weight, v, m, mask=mask)
    assert torch.equal(again.to_dense(), compressed.to_dense())


def test_from_dense_accepts_sparser_masks():
    weight = torch.randn(16, 16)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, 0] = True  # one column used, one value a row
    compressed = vnm.VNMWeight.from_dense(weight, 16, 8, mask=mask)
    assert torch.equal(compressed.to_dense(), weight * mask)


def test_from_dense_rejects_bad_input():
    weight = torch.randn(16, 16)
    with pytest.raises(ValueError, match="mask is not a valid"):
        vnm.VNMWeight.from_dense(weight, 16, 8, mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="weight dtype"):
        vnm.VNMWeight.from_dense(weight.double(), 16, 8)
    with pytest.raises(ValueError, match="scores has shape"):
        vnm.VNMWeight.from_dense(weight, 16, 8, scores=torch.rand(16, 8))


def test_state_dict_round_trip(tmp_path):
    weight = vnm.VNMWeight.from_dense(torch.randn(70, 45, dtype=torch.bfloat16), 16, 6)
    torch.save(weight.state_dict(), tmp_path / "w.pt")
    loaded = vnm.VNMWeight.from_state_dict(torch.load(tmp_path / "w.pt"))
    assert (loaded.v, loaded.m, loaded.shape, loaded.dtype) == (16, 6, torch.Size((70, 45)), torch.bfloat16)
    assert torch.equal(loaded.to_dense(), weight.to_dense())
    with pytest.raises(ValueError, match="lacks"):
        vnm.VNMWeight.from_state_dict({"values": weight.values})


@pytest.mark.parametrize("m", [5, 8, 16])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_bytes_near_two_over_m(shape, m):
    weight = torch.randn(shape, dtype=torch.float16)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, 0::m] = mask[:, 1::m] = True  # the size depends on the shape only: any valid mask will do
    compressed = vnm.VNMWeight.from_dense(weight, 64, m, mask=mask)
    dense_bytes = weight.numel() * weight.element_size()
    assert compressed.nbytes <= (2 / m) * dense_bytes * 1.15


def brute_force_mask_count(v, m):
    pairs = list(itertools.combinations(range(m), 2))
    return sum(len(set().union(*rows)) <= 4 for rows in itertools.product(pairs, repeat=v))


@pytest.mark.parametrize("v,m", [(1, 4), (1, 6), (2, 4), (2, 5), (2, 7), (4, 5), (4, 6)])
def test_mask_count_matches_brute_force(v, m):
    assert vnm.mask_count(v, m) == brute_force_mask_count(v, m)


def test_mask_diversity_and_selection():
    assert vnm.mask_count(64, 4) == 6**64  # 2:4 has exactly 6 choices a row
    assert math.comb(8, 4) * 6**64 > vnm.mask_count(64, 8) > 0.99 * math.comb(8, 4) * 6**64
    assert vnm.log_mask_diversity(16, 8) > vnm.log_mask_diversity(64, 8) > vnm.log_mask_diversity(64, 16)
    v, m = vnm.select_vm(1.5)
    assert vnm.analytic_speedup(v, m) >= 1.5
    better = [(v2, m2) for v2 in (16, 32, 64, 128) for m2 in range(4, 33)
              if vnm.analytic_speedup(v2, m2) >= 1.5 and vnm.log_mask_diversity(v2, m2) > vnm.log_mask_diversity(v, m)]
    assert not better
    assert vnm.select_vm(1.0, speedup_model=lambda v, m: m / 4.0) == (16, 4)
    with pytest.raises(ValueError, match="target_speedup"):
        vnm.select_vm(100.0)
