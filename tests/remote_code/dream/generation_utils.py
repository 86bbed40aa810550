"""Stand-in for the generation config Dream's released code reads in its own `from_pretrained`: a
`GenerationConfig` subclass whose `__init__` sets its fields itself and whose `validate` takes only `is_init`, as
written for transformers 4.x (newer versions pass `user_set_attributes` while reading generation_config.json)."""

import transformers
from transformers import GenerationConfig


class DreamGenerationConfig(GenerationConfig):
    def __init__(self, **kwargs) -> None:
        self.steps = kwargs.pop("steps", 512)
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self._from_model_config = kwargs.pop("_from_model_config", False)
        self._commit_hash = kwargs.pop("_commit_hash", None)
        self.transformers_version = kwargs.pop("transformers_version", transformers.__version__)
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.validate(is_init=True)

    def validate(self, is_init=False) -> None:
        pass
