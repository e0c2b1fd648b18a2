"""`MultiTaskConfig`: the JSON-serialisable description of a `MultiTaskModel`."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class MultiTaskConfig(PretrainedConfig):
    """Configuration of a `MultiTaskModel`.

    Args:
        encoders (`dict[str, dict]`):
            Encoder key -> that encoder's config as a dict (``PretrainedConfig.to_dict()``, which
            carries ``model_type``). Any Hugging Face encoder works: BERT-like text, ViT-like vision,
            Wav2Vec2-like speech.
        tasks (`list[dict]`):
            The tasks, as ``Task.to_dict()``.
        trunk (`dict`, *optional*):
            An optional shared trunk on top of every encoder: ``{"hidden_size": int, "num_layers": int}``.
            Each encoder's hidden states are projected to ``hidden_size`` and then pass through the
            same ``num_layers`` residual MLP blocks, so the trunk is shared by every task of every
            modality.
        head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before each head's output layer.
        adapters (`dict[str, dict]`, *optional*):
            Encoder key -> the PEFT config (``PeftConfig.to_dict()``, JSON-safe) of the adapter that wraps that
            encoder (LoRA, IA3, ...). `MultiTaskModel` wraps the rebuilt encoder with ``peft.get_peft_model`` so that
            a saved model with adapters reloads with them. Filled in by `MultiTaskModel.from_encoders` when an
            encoder is a `peft.PeftModel`.
        encoder_sources (`dict[str, str]`, *optional*):
            Encoder key -> the name (a Hub model id) or the path (a local folder, or ``pkg://<package>/<folder>``)
            that encoder's pretrained weights were loaded from. Filled in by `MultiTaskModel.from_encoders` (from the
            name it was given, or the encoder's ``config._name_or_path``). For an encoder with an adapter
            (`adapters`) the saved weights leave its frozen base out, as PEFT saves an adapter without its base, and
            ``from_pretrained`` loads that base from here (offline from the Hugging Face cache with
            ``HF_HUB_OFFLINE=1``).
        removed_modules (`dict[str, list[str]]`, *optional*):
            Encoder key -> dotted names of the submodules that the encoder's class builds from its config
            but that the given encoder left out (``["pooler"]`` for ``BertModel(config, add_pooling_layer=False)``).
            `MultiTaskModel.from_encoders` fills it in, so that a reloaded model has exactly the saved parameters.
    """

    model_type = "hf_mtl"

    def __init__(
        self,
        encoders: dict[str, dict[str, Any]] | None = None,
        tasks: list[dict[str, Any]] | None = None,
        trunk: dict[str, Any] | None = None,
        head_dropout: float = 0.1,
        removed_modules: dict[str, list[str]] | None = None,
        adapters: dict[str, dict[str, Any]] | None = None,
        encoder_sources: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.encoders = dict(encoders or {})
        self.tasks = list(tasks or [])
        self.trunk = dict(trunk) if trunk else None
        self.head_dropout = head_dropout
        self.removed_modules = {key: list(names) for key, names in (removed_modules or {}).items()}
        self.adapters = {key: dict(adapter) for key, adapter in (adapters or {}).items()}
        self.encoder_sources = {key: str(source) for key, source in (encoder_sources or {}).items()}
        super().__init__(**kwargs)

    def encoder_config(self, key: str) -> PretrainedConfig:
        """The `PretrainedConfig` of encoder ``key``."""
        if key not in self.encoders:
            raise ValueError(f"unknown encoder {key!r}; the encoders are: {', '.join(sorted(self.encoders))}")
        data = dict(self.encoders[key])
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"encoder {key!r}: its config has no `model_type`")
        return AutoConfig.for_model(model_type, **data)
