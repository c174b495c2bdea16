"""Registration of linearized models with transformers' Auto classes (done at ``import nbl_ext``).

For every family with an adapter (``nbl_ext.adapters``), the config class ``NBL<Base>Config``
(model_type ``"nbl_<family>"``) goes to ``AutoConfig`` and the model class ``NBL<Base>`` (the class
``AutoModelForCausalLM`` builds for the family, with the layers in ``config.nbl`` linearized) to
``AutoModelForCausalLM``. After ``import nbl_ext``::

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="auto")

runs transformers' own loading path (meta-device construction, sharded safetensors, dtype, device_map
with CPU/disk offload through accelerate). Without nbl_ext, transformers does not know the model type
and refuses the directory ("model type `nbl_llama` ... does not recognize this architecture").
"""

from __future__ import annotations

from nbl_ext.adapters import supported_model_types
from nbl_ext.linearize import nbl_config_class, nbl_model_class


def family_classes(model_type: str) -> tuple[type, type]:
    """(NBL config class, NBL model class) of family ``model_type`` (the class AutoModelForCausalLM builds)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = CONFIG_MAPPING[model_type]
    return nbl_config_class(base_config), nbl_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[base_config])


def register_auto_classes() -> list[str]:
    """Register the NBL config and model classes of every supported family; returns their model types."""
    from transformers import AutoConfig, AutoModelForCausalLM

    registered = []
    for model_type in supported_model_types():
        config_cls, model_cls = family_classes(model_type)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        registered.append(config_cls.model_type)
    return registered
