"""MLM on the augmented report (``loss.mlm_view=augmented``): the loader's masking carried over to the view.

The loader masks the report (``mlm_input_ids`` / ``mlm_labels``: BERT's 80 % [MASK], 10 % random token, 10 %
kept, over positions drawn from each sample's own seeded generator). Masking the augmented report instead lets
MLM read the token states of the pass text_ssl already runs, one text-tower pass fewer per step (issue 21's
cost budget). The loader is left as it is: the same positions and the same per-position action are applied
to the augmented report's tokens on the device, so the choice of positions stays seeded per sample (exact
resume) and the action mix is BERT's.
"""
from __future__ import annotations

import torch
from torch import nn


class ViewMasker(nn.Module):
    """``forward(view_ids, report_ids, mlm_ids, mlm_labels) -> (masked view_ids, labels)``.

    A position is a target when the loader chose it in the report (``mlm_labels != -100``) and the view holds
    an ordinary token there (not a special token, padding or an augmentation's [MASK]). Its action is read
    back from the report's masking: [MASK] where the report got [MASK], the report's random token where it got
    one, the view's own token where the report kept its token. Targets are the view's tokens.
    """

    def __init__(self, tokenizer):
        super().__init__()
        if tokenizer.mask_token_id is None:
            raise ValueError("masked language modelling needs a tokenizer with a mask token")
        self.mask_id = int(tokenizer.mask_token_id)
        special = sorted(set(int(i) for i in tokenizer.all_special_ids))
        self.register_buffer("special_ids", torch.tensor(special, dtype=torch.long), persistent=False)

    def forward(self, view_ids: torch.Tensor, report_ids: torch.Tensor, mlm_ids: torch.Tensor,
                mlm_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if view_ids.shape != mlm_labels.shape:
            raise ValueError(f"loss.mlm_view=augmented needs the augmented report padded like the report "
                             f"(got {tuple(view_ids.shape)} and {tuple(mlm_labels.shape)})")
        chosen = (mlm_labels != -100) & ~torch.isin(view_ids, self.special_ids.to(view_ids.device))
        to_mask = chosen & (mlm_ids == self.mask_id)
        to_random = chosen & (mlm_ids != self.mask_id) & (mlm_ids != report_ids)
        ids = torch.where(to_mask, torch.full_like(view_ids, self.mask_id), view_ids)
        ids = torch.where(to_random, mlm_ids, ids)
        return ids, torch.where(chosen, view_ids, torch.full_like(view_ids, -100))
