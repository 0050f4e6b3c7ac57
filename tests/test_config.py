import pytest

import vnm_compile as vnm


def test_defaults_are_valid():
    config = vnm.VNMConfig()
    assert (config.v, config.m, config.criterion) == (64, 8, "ria")


@pytest.mark.parametrize("field,value", [
    ("v", 48), ("v", 8), ("v", -64), ("v", "64"), ("m", 3), ("m", 1000), ("m", 8.0),
    ("criterion", "magnitude"), ("method", "obs"), ("ria_exponent", -1.0), ("ria_exponent", "half"),
    ("column_select", "greedy"), ("pattern", "2:4"), ("n", 3), ("permute", "yes"), ("sparsify", 1), ("verify", None),
    ("permute_rounds", -1), ("skip", [3]),
])
def test_every_bad_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        vnm.VNMConfig(**{field: value})


def test_small_v_needs_explicit_flag():
    with pytest.raises(ValueError, match="allow_small_v"):
        vnm.VNMConfig(v=4)
    assert vnm.VNMConfig(v=4, allow_small_v=True).v == 4


def test_from_options():
    config = vnm.VNMConfig.from_options({"v": 32, "m": 6, "skip": "lm_head"})
    assert (config.v, config.m, config.skip) == (32, 6, ("lm_head",))
    with pytest.raises(ValueError, match="unknown vnm option.*'vv'"):
        vnm.VNMConfig.from_options({"vv": 32})


@pytest.mark.parametrize("field,value", [
    ("min_features", -1), ("min_features", 1.5), ("dtypes", ["float64"]), ("dtypes", []), ("dtypes", ["int8"]),
    ("permute_budget_s", 0), ("permute_budget_s", "1h"), ("max_layer_error", 0.0), ("max_layer_error", float("inf")),
    ("inductor", "yes"),
])
def test_backend_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        vnm.VNMConfig(**{field: value})


def test_backend_field_defaults_and_normalisation():
    config = vnm.VNMConfig(dtypes="bfloat16", max_layer_error=0.5)
    assert config.dtypes == ("bfloat16",) and config.max_layer_error == 0.5
    assert vnm.VNMConfig().dtypes == ("float32", "float16", "bfloat16")
    assert vnm.VNMConfig.from_options({"min_features": 0, "permute_budget_s": 5}).min_features == 0


@pytest.mark.parametrize("field", ["only", "exclude"])
@pytest.mark.parametrize("value", [[3], [""], 7, ["mlp.*", None]])
def test_bisection_globs_are_validated(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be a list of glob patterns"):
        vnm.VNMConfig(**{field: value})


def test_bisection_globs_from_options():
    config = vnm.VNMConfig.from_options({"only": "*.mlp.*", "exclude": ["lm_head", "*.0.*"]})
    assert config.only == ("*.mlp.*",) and config.exclude == ("lm_head", "*.0.*")
