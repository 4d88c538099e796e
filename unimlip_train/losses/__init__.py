"""Uni-Mlip losses: gathered-negative contrastive losses, the eight terms and the weighted objective."""
from unimlip_train.losses.contrastive import contrastive_loss, nt_xent, sigmoid_loss
from unimlip_train.losses.hard_negatives import sample_hard_negatives
from unimlip_train.losses.objective import AccumulationCache, UniMlipObjective
from unimlip_train.losses.terms import TERMS

__all__ = ["contrastive_loss", "nt_xent", "sigmoid_loss", "sample_hard_negatives", "AccumulationCache",
           "UniMlipObjective", "TERMS"]
