"""Layer 3, weights and formats: reading weights files safely, finding the components of a checkpoint tree,
building each network strictly, the merged safetensors export (reading and writing), quantization."""
