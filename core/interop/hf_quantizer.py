"""transformers-native loading: a ``squeezellm`` quantization config and ``HfQuantizer``.

After ``register_squeezellm()`` (run when ``core.interop`` is imported),
``AutoModelForCausalLM.from_pretrained(quantized_folder)`` builds the model on the meta device,
swaps every module listed in the folder's ``quantization_config["modules"]`` for an empty
``SqueezeLinear`` (or ``GroupQuantLinear`` for the round-to-nearest baselines) *before* the
weights load, and then lets transformers fill the packed buffers from ``model.safetensors``.
``save_pretrained`` of such a model writes the same folder format (config block kept verbatim),
which ``core.checkpoint.load_quantized`` reads.

Uses only transformers' public registration API (``register_quantization_config`` /
``register_quantizer``); tested with transformers 5.x. Loading only: a dense model cannot be
quantized through ``from_pretrained(quantization_config=...)`` (use ``squeeze quantize``).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from core.checkpoint import QUANT_METHOD, build_quantized_module


class SqueezeLLMConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a Squeeze Studio folder, carried through unchanged.

    modules: module name -> layout dict (``SqueezeLinear.layout()``); every other key of the
    block (bits, settings, format_version, imported_from...) is kept as an attribute so that
    ``to_dict()`` writes back exactly what was read.
    """

    def __init__(self, modules: dict[str, dict] | None = None, **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD  # a plain string: transformers' enum does not list it
        self.modules = dict(modules or {})
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)


class SqueezeLLMHfQuantizer(HfQuantizer):
    """Loads pre-quantized SqueezeLLM folders (dense-and-sparse LUT layers) in ``from_pretrained``."""

    requires_calibration = True  # pre-quantized folders only
    quantization_config: SqueezeLLMConfig

    def __init__(self, quantization_config: SqueezeLLMConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        """Replace the listed linears by empty (meta) quantized modules of the stored sizes, and a quantized
        embedding / head (``embed_head``, core.embed_head) by theirs."""
        for name, info in self.quantization_config.modules.items():
            model.set_submodule(name, build_quantized_module(info))
        embed_head = getattr(self.quantization_config, "embed_head", None)
        if embed_head:
            from core.embed_head import empty_modules, install

            install(model, empty_modules(model, embed_head, model.dtype))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Link sibling layers that read the same input (q/k/v, gate/up) to run as one kernel call."""
        from core.shared_input import link_shared_inputs

        link_shared_inputs(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:  # 4.x passes safe_serialization
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_squeezellm() -> None:
    """Register the config and quantizer with transformers; calling it again does nothing."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SqueezeLLMConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SqueezeLLMHfQuantizer)
