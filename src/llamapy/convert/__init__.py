"""Make model files: quantize GGUF files, convert Hugging Face folders to GGUF, quantize
weights while a model loads."""
