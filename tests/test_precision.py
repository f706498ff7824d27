import pytest
import torch

from fxpipe.errors import ConfigError
from fxpipe.precision import PRECISIONS, check_precision, compute_dtype, uses_autocast, uses_loss_scaling


def test_precision_names_and_dtypes():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert compute_dtype("bf16") is torch.bfloat16 and compute_dtype("fp16") is torch.float16
    assert compute_dtype("fp32") is torch.float32
    assert [uses_autocast(p) for p in PRECISIONS] == [False, True, True]
    assert [uses_loss_scaling(p) for p in PRECISIONS] == [False, False, True]


@pytest.mark.parametrize("bad", ["fp8", "BF16", None, 16])
def test_unknown_precision_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="unknown precision"):
        check_precision(bad)
