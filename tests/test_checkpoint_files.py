"""DeepSpeed's checkpoint files are read with ``weights_only``: what they pickle besides tensors is allowed by name,
including the ``getattr(ZeroStageEnum, name)`` some Python versions write for an Enum member (3.11.2 does, 3.11.7
does not: a fresh clone on Debian's Python could not read its own checkpoints), and nothing else through getattr."""
import pickle

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from unimlip_train.engine.checkpoint.optimizer_state import load_pt


class _EnumAsOldPythonPickles:
    def __reduce__(self):
        return getattr, (ZeroStageEnum, "optimizer_states")


class _AnyAttribute:
    def __reduce__(self):
        return getattr, (LossScaler, "__init__")


def test_an_enum_member_pickled_through_getattr_loads_and_nothing_else_does(tmp_path):
    torch.save({"zero_stage": _EnumAsOldPythonPickles(), "t": torch.ones(2)}, tmp_path / "ok.pt")
    loaded = load_pt(str(tmp_path / "ok.pt"))
    assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states and torch.equal(loaded["t"], torch.ones(2))
    torch.save({"x": _AnyAttribute()}, tmp_path / "other.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_pt(str(tmp_path / "other.pt"))
