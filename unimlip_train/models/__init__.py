"""The Uni-Mlip model: the timm image tower (``image_tower``), the Hugging Face text tower (``text_tower``), the
fusion encoder (``fusion``), their assembly (``unimlip``), pretrained weights (``pretrained``), tower locking
(``locking``), and what the engine builds and wraps (``build``: ``build_model``, ``TrainStep``)."""
