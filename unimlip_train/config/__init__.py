"""Typed, validated run configuration: ``schema`` (the dataclasses, one ``Literal`` per set of choices), ``load``
(YAML ``extends``, ``key.sub=value`` overrides, type checks), ``validate`` (cross-field checks), ``origins``
(which file set each key, so every error names it). Config imports no other package of ours; the model-side
step (timm name, pretrained input config) is ``unimlip_train.models.pretrained.resolve_towers`` and the
data-side one (``data.augment``'s transforms) ``unimlip_train.data.augment.check_augment``, passed to
``load_config(..., resolve=...)`` by the entry points.
"""
