"""Locked towers (LiT, Zhai et al. 2022) and the layer depth that locking and layer-wise lr decay share.

A tower's parameters fall into layer groups numbered from 0 (stem / embeddings) to the top block; ``lock`` freezes
every group except the last ``unlocked_groups`` (open_clip's ``lock_image_unlocked_groups`` /
``lock_text_unlocked_layers``). A frozen part has ``requires_grad=False``, so the optimizer holds no state for it,
and stays in eval mode whatever mode the tower is put in: no dropout inside it, its BatchNorm statistics frozen.
"""
from __future__ import annotations

from torch import nn


def fully_frozen(module: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen (parameter-free modules follow their parent)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [m for child in module.children() for m in fully_frozen(child)]


class LockableTower(nn.Module):
    """Base of the towers: ``layer_ids`` (per subclass), ``lock``, and a ``train`` that keeps frozen parts in eval."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen: list[nn.Module] = []

    def layer_ids(self) -> dict[str, int]:
        """Layer group of every parameter (name as in ``named_parameters``): 0 = stem ... max = top block."""
        raise NotImplementedError

    def lock(self, unlocked_groups: int, key: str) -> None:
        """Freeze the tower except its last ``unlocked_groups`` layer groups; ``key`` names the config key in errors."""
        if unlocked_groups == 0:
            frozen = {name for name, _ in self.named_parameters()}
        else:
            ids = self.layer_ids()
            top = max(ids.values())
            if unlocked_groups > top:
                raise ValueError(f"{key}={unlocked_groups}: the tower has {top + 1} layer groups, so this would "
                                 f"leave nothing locked (at most {top})")
            frozen = {name for name, layer in ids.items() if layer <= top - unlocked_groups}
        for name, p in self.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        self._frozen = [m for child in self.children() for m in fully_frozen(child)]
        self.train(self.training)

    def unlock(self) -> None:
        """Everything trainable again (a fine-tuning run decides afresh what to lock)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = []

    def train(self, mode: bool = True) -> "LockableTower":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self
