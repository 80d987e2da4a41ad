"""Model families: one class per family, chosen by the config's architecture."""

from __future__ import annotations

from collections.abc import Callable

from llamapy.errors import UnsupportedError
from llamapy.formats import GGUFFile, HFFolder
from llamapy.models.llama import Gemma3ForCausalLM, LlamaForCausalLM
from llamapy.models.weights import Weights
from llamapy.quant.qtensor import QTensor

CAUSAL_LM_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def build_causal_lm(
    model_file: GGUFFile | HFFolder,
    requantize: Callable[[str, QTensor], QTensor] | None = None,
) -> LlamaForCausalLM:
    """The text-generation model of an opened file; weights stay views of the file (or are
    quantized as they are read, by `requantize`: see `llamapy.convert.at_load`)."""
    arch = model_file.config.arch
    cls = CAUSAL_LM_CLASSES.get(arch)
    if cls is None:
        raise UnsupportedError(f"architecture {arch!r} cannot generate text")
    model = cls(Weights(model_file, requantize))
    return model.eval()


__all__ = ["CAUSAL_LM_CLASSES", "build_causal_lm"]
