"""Interop: the original SqueezeLLM's packed checkpoints in, formats the ecosystem serves out,
and transformers-native loading of quantized folders.

Importing this package registers the ``squeezellm`` quantization method with transformers
(idempotent; it imports transformers, never Qt, and does not initialise CUDA), so that
``AutoModelForCausalLM.from_pretrained(quantized_folder)`` returns a model with SqueezeLinear
layers. The submodules hold the work:

  original_pt   import_original_checkpoint(ckpt, base, output, bits=None)   (.pt -> folder)
  export        export_model(folder, fmt, output, dtype=..., overwrite=False) (folder -> other formats)
  hf_quantizer  SqueezeLLMConfig, SqueezeLLMHfQuantizer, register_squeezellm()
"""

from core.interop.hf_quantizer import register_squeezellm

register_squeezellm()

__all__ = ["register_squeezellm"]
